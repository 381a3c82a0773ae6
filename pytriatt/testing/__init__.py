"""Models for tests and measurements, written without downloading anything.

    tiny    tiny random-weight GGUF models of many architectures (tests, docs examples, the fuzzer)
    synth   random-weight models of real shapes (Qwen3-8B, ...) for speed measurements
"""
