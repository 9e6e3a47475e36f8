"""How the maths runs on a machine: data-parallel draws, numerical precision, attention kernels, files.

Everything else in orch.methods builds on these; they import nothing else of orch."""
