"""Optimization: the optimizer interface (``base``) and the choice of one (``build``); AdamW
with fp32 master weights (``optimizer``), DeepSpeed ZeRO (``zero``), loss scaling
(``loss_scaler``), global-norm clipping (``grad_clip``), the LR schedule (``lr_schedule``)."""
