"""The method: DEVFT's science, free of any transport.

Layer similarity and deconfliction-guided grouping (§3.2), differential-based fusion and the fold-back
of a stage's LoRA into every layer of its group (§3.3), stage submodels, the schedules that decide
when a submodel grows, LoRA state, healing, aggregation rules, and the strategies (DEVFT, FedIT,
FFA-LoRA) that put these together. Imports nothing from engine/, fleet/ or cli/.
"""
