"""The study-service issue's spec, verbatim: the contract both spec and study tests use."""

CONTRACT_SPEC = """\
[study]
name = "digits-quick"
task = "digits"
metric = "val_accuracy"      # or "val_loss"; direction follows (maximize / minimize)
n_trials = 12
sampler = "tpe"              # tpe | random | cmaes | gp | grid | nsga2
pruner = "median"            # none | median | successive_halving | hyperband
seed = 0

[train]
epochs = 10

[space]
optimizer = ["sgd", "momentum", "adam", "rmsprop"]
lr = { low = 1e-4, high = 0.5, log = true }
init = ["xavier_uniform", "he_normal"]
norm = ["none", "batch"]
activation = ["relu", "tanh"]
batch_size = [32, 64]
"""
