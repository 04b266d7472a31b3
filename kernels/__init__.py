"""The kernels of train_gpt2.py, one per layer. reference.py holds their NumPy twins (fp32): the CPU
backend, and the definition of what each kernel computes."""
