"""Training, evaluation and prediction for UperNet on the fused model (``upernet-fast train | eval | predict``).

Modules: ``backbones`` (names -> configs), ``data`` (sources, augmentation, resumable sampling), ``loop`` (the
trainer, one process or DDP under torchrun), ``checkpoint`` (atomic, verified checkpoints), ``metrics``
(confusion-matrix mIoU), ``evaluate`` (sliding-window evaluation and prediction).
"""
