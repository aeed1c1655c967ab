"""A small Flower app that runs devft's FedIT with Flower's own FedAvg and simulation engine,
side by side with devft in benchmarks/simulation.py (needs the [bench-flower] extra).

It reads the JSONL shards and held-out set a devft run wrote, fixes devft's client schedule
(`rounds.sample_clients`) and per-client seeds (`rounds.client_seed`), and trains each client
with devft's `local_train` on the same LoRA settings, so the two differ only in the engine:
Flower's ServerApp/ClientApp messages on Ray actors against devft's round loop.
"""
