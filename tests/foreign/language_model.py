"""Lightning's demo language model style: an ``nn.Transformer`` encoder, the loss in ``training_step``, no
``forward`` on the LightningModule."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import DataLoader, Dataset


class PositionalEncoding(nn.Module):
    def __init__(self, dim: int, max_len: int = 64):
        super().__init__()
        position = torch.arange(max_len).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
        pe = torch.zeros(max_len, 1, dim)
        pe[:, 0, 0::2] = torch.sin(position * div_term)
        pe[:, 0, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe)

    def forward(self, x):
        return x + self.pe[: x.size(0)]


class TransformerLM(nn.Module):
    def __init__(self, vocab_size: int = 12, ninp: int = 8, nhead: int = 2, nhid: int = 16, nlayers: int = 1):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, ninp)
        self.pos_encoder = PositionalEncoding(ninp)
        layer = nn.TransformerEncoderLayer(ninp, nhead, nhid, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, nlayers, enable_nested_tensor=False)
        self.decoder = nn.Linear(ninp, vocab_size)
        self.ninp = ninp
        self.vocab_size = vocab_size

    def forward(self, inputs):
        # (batch, seq) token ids -> (seq * batch, vocab) log-probabilities, sequence first as nn.Transformer wants
        src = self.embedding(inputs.t()) * math.sqrt(self.ninp)
        seq_len = src.size(0)
        mask = torch.triu(torch.full((seq_len, seq_len), float("-inf"), device=src.device), diagonal=1)
        output = self.encoder(self.pos_encoder(src), mask=mask)
        return F.log_softmax(self.decoder(output), dim=-1).view(-1, self.vocab_size)


class LightningTransformer(LightningModule):
    def __init__(self, vocab_size: int = 12):
        super().__init__()
        self.model = TransformerLM(vocab_size=vocab_size)

    def training_step(self, batch, batch_idx):
        inputs, target = batch
        output = self.model(inputs)
        loss = F.nll_loss(output, target.t().reshape(-1))
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.1)


class CountingSequences(Dataset):
    """Token sequences that count up modulo the vocabulary from a random start: the next token is predictable."""

    def __init__(self, vocab_size: int = 12, seq_len: int = 6, length: int = 64):
        starts = torch.randint(vocab_size, (length, 1), generator=torch.Generator().manual_seed(1))
        self.tokens = (starts + torch.arange(seq_len + 1)) % vocab_size

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, index):
        return self.tokens[index, :-1], self.tokens[index, 1:]


def lm_loss(model, batch):
    """The module's training loss, as a ``loss_fn`` (the module has no ``forward``)."""
    inputs, target = batch
    return F.nll_loss(model.model(inputs), target.t().reshape(-1))


def lm_loader(batch_size: int = 16) -> DataLoader:
    return DataLoader(CountingSequences(), batch_size=batch_size, shuffle=True)
