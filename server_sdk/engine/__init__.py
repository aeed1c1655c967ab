"""The round engine: one federated fine-tuning, whoever trains.

The round loop (rounds.run), the executor interface and the simulated executors (in-process, Ray; the
fleet's executor lives in fleet/), simulated local training and evaluation, the base model and its frozen
weights, precision and quantized weights on the server, checkpoints and the run's report.
Uses method/; imports nothing from fleet/ or cli/.
"""
