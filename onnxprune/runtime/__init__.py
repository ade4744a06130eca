"""The onnxruntime side: verification of a pruned model (:mod:`.verify`), latency
measurement (:mod:`.latency`), multi-model benchmarks (:mod:`.bench`), channel sweeps for
``round_to`` (:mod:`.sweep`), per-node profiles (:mod:`.profile`), the per-node latency
model (:mod:`.latency_model`) and the measure-and-correct search for a latency target
(:mod:`.latency_search`)."""
