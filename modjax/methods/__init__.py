"""Methods: what each paper adds to the bank layer, as pure functions over (bank, plan) plus the
step functions that train them. A method imports models, the bank and the training step; no
model imports a method."""
