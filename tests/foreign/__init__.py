"""Small LightningModules written the way other projects write theirs (their style, not their code).

Each file imitates one source: Lightning's BoringModel (``boring``), its ``nn.Transformer`` language model with the
loss in ``training_step`` and no ``forward`` (``language_model``), the autoencoder and backbone classifier run
through LightningCLI (``cli_models``), the GAN with manual optimization and two optimizers (``gan``),
lightning-hydra-template's MNIST module and datamodule with a per-device batch size set in ``setup``
(``hydra_template``), a HuggingFace-style BERT classifier with dict batches (``bert_like``), and a small regression
model written against the ``pytorch_lightning`` package (``pl_regression``). Data are generated, never downloaded,
and every model is tiny, so the tests that run the project's features on them stay fast.
"""
