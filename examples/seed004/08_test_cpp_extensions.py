# Seed 004 README snippet, verbatim: test cpp extensions.
# Snippets after the first continue the same Python session (tests/test_seed004_examples.py runs them in order).
try:
    from bitcore.kernels.bindings import bitlinear_int8_pt_pt_cpp
    print("✅ C++ extensions available")
    print(f"Available functions: {[f for f in dir(bitlinear_int8_pt_pt_cpp) if not f.startswith('_')]}")
except ImportError as e:
    print(f"❌ C++ extensions not available: {e}")
    print("Will use PyTorch fallback")
