"""HuggingFace style: a tiny BERT-like sequence classifier whose forward takes ``input_ids``, ``attention_mask``,
``labels`` and returns an output object with ``.loss`` and ``.logits``; dict batches; AdamW with a warmup."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn
from torch.utils.data import DataLoader, Dataset


@dataclass
class BertConfig:
    vocab_size: int = 20
    hidden_size: int = 8
    num_attention_heads: int = 2
    intermediate_size: int = 16
    max_position_embeddings: int = 16
    num_labels: int = 3


@dataclass
class SequenceClassifierOutput:
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None

    def __getitem__(self, index):
        return tuple(v for v in (self.loss, self.logits) if v is not None)[index]


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_size = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)

    def split_heads(self, x):
        return x.view(*x.shape[:-1], self.num_heads, self.head_size).transpose(1, 2)

    def forward(self, hidden_states, attention_mask):
        q, k, v = (self.split_heads(f(hidden_states)) for f in (self.query, self.key, self.value))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_size)
        scores = scores + (1.0 - attention_mask[:, None, None, :].to(scores.dtype)) * -1e4
        context = F.softmax(scores, dim=-1) @ v
        return context.transpose(1, 2).reshape(hidden_states.shape)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertSelfAttention(config)
        self.attention_output = nn.Linear(config.hidden_size, config.hidden_size)
        self.attention_norm = nn.LayerNorm(config.hidden_size)
        self.intermediate = nn.Linear(config.hidden_size, config.intermediate_size)
        self.output = nn.Linear(config.intermediate_size, config.hidden_size)
        self.output_norm = nn.LayerNorm(config.hidden_size)

    def forward(self, hidden_states, attention_mask):
        attended = self.attention_output(self.attention(hidden_states, attention_mask))
        hidden_states = self.attention_norm(hidden_states + attended)
        return self.output_norm(hidden_states + self.output(F.gelu(self.intermediate(hidden_states))))


class BertForSequenceClassification(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.embedding_norm = nn.LayerNorm(config.hidden_size)
        self.layer = BertLayer(config)
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, input_ids, attention_mask=None, labels=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = self.embedding_norm(self.word_embeddings(input_ids) + self.position_embeddings(positions))
        hidden = self.layer(hidden, attention_mask)
        logits = self.classifier(torch.tanh(self.pooler(hidden[:, 0])))
        loss = None
        if labels is not None:
            loss = nn.CrossEntropyLoss()(logits.view(-1, self.config.num_labels), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)


class GLUETransformer(LightningModule):
    def __init__(self, num_labels: int = 3, learning_rate: float = 5e-3, warmup_steps: int = 2,
                 weight_decay: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        self.model = BertForSequenceClassification(BertConfig(num_labels=num_labels))

    def forward(self, **inputs):
        return self.model(**inputs)

    def training_step(self, batch, batch_idx):
        outputs = self(**batch)
        loss = outputs[0]
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        outputs = self(**batch)
        val_loss, logits = outputs[:2]
        accuracy = (logits.argmax(-1) == batch["labels"]).float().mean()
        self.log_dict({"val_loss": val_loss, "accuracy": accuracy}, prog_bar=True)

    def configure_optimizers(self):
        no_decay = ["bias", "LayerNorm.weight"]
        grouped = [
            {"params": [p for n, p in self.model.named_parameters() if not any(nd in n for nd in no_decay)],
             "weight_decay": self.hparams.weight_decay},
            {"params": [p for n, p in self.model.named_parameters() if any(nd in n for nd in no_decay)],
             "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(grouped, lr=self.hparams.learning_rate)
        warmup = self.hparams.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return [optimizer], [{"scheduler": scheduler, "interval": "step", "frequency": 1}]


class TokenClassificationData(Dataset):
    """Padded token sequences labelled by which of three marker tokens occurs most often."""

    def __init__(self, length: int = 96, seq_len: int = 10, vocab_size: int = 20, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(3, vocab_size, (length, seq_len), generator=g)
        self.input_ids[:, 0] = 2  # a [CLS]-like token the pooler reads
        lengths = torch.randint(seq_len // 2, seq_len + 1, (length,), generator=g)
        self.attention_mask = (torch.arange(seq_len) < lengths[:, None]).long()
        self.input_ids[self.attention_mask == 0] = 0
        counts = torch.stack([(self.input_ids == 3 + k).sum(1) for k in range(3)], 1)
        self.labels = counts.argmax(1)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index],
                "labels": self.labels[index]}


class GLUEDataModule(LightningDataModule):
    def __init__(self, train_batch_size: int = 16, eval_batch_size: int = 16, num_samples: int = 96):
        super().__init__()
        self.train_batch_size = train_batch_size
        self.eval_batch_size = eval_batch_size
        self.num_samples = num_samples

    def setup(self, stage: str):
        self.train = TokenClassificationData(length=self.num_samples)
        self.validation = TokenClassificationData(length=32, seed=1)

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=self.train_batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.validation, batch_size=self.eval_batch_size)


def bert_loss(model, batch):
    """The model's own loss (``outputs.loss``), as a ``loss_fn`` for dict batches."""
    return model(**batch).loss
