"""What every method, network and sampler agrees on: registries and options, the Method/Term contract,
the interpolant and time conventions, time samplers, the flow map and its samplers, guidance maths, and the
counting of network passes."""
