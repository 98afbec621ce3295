"""Optimization: AdamW with fp32 master weights (``optimizer``), loss scaling (``loss_scaler``),
global-norm clipping (``grad_clip``), DeepSpeed ZeRO (``zero``), the LR schedule
(``lr_schedule``)."""
