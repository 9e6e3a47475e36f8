"""The science of orch: interpolants, flow maps, few-step training methods, networks, data and metrics.

Nothing here knows about Ray, Slurm or MLflow. Canonical time convention (docs/methods.md §1): τ = 0 is noise,
τ = 1 is data, a jump goes from a to b, networks return the average velocity v(x; a, b) and the flow map is
X_{a,b}(x) = x + (b − a)·v(x; a, b).
"""
