"""How the shipped model was made: its domain, training, distillation, checker and shipping.

Not part of the installed package (the runtime never needs it). Run from the repository root,
e.g. `python -m training.train all --run runs/shipped`; modules here import each other relatively
and edgediff itself absolutely.
"""
