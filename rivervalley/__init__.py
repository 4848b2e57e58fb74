"""rivervalley: river-valley loss landscapes, the closed-form theory of checkpoint averaging and
extrapolation, and a fast batched optimizer simulator that tests it.

Where each concern lives (nothing is imported here; import the module you need):
    weights        affine weight vectors (SMA, EMA, WMA, Extra-Merge, trend, optimal), apply, lag — the leaf
    checks         argument checks of the model parameters (a leaf)
    theory/        closed forms: kernels, filters (§a–c), extrapolation (§d), merges, rank1, decay
    symbolic       sympy re-derivations of the identities
    analysis       Gram matrix, PCA, FVE, the PC1 trend
    estimate       river-valley parameters of a trajectory from merge losses (THEORY §g)
    landscapes/    quadratic and curved river-valley landscapes
    optimizers     SGD, Adam, Muon on batched seeds; schedules: constant, cosine, WSD
    simulate/      the batched simulator (+ _native, its compiled noise kernel)
    validate/      formula versus simulation, the validation grid
    figures/       one module per paper figure (`rivervalley figures`, `python -m rivervalley.figures.NAME`)
    common/        plumbing shared with extramerge: publish (atomic outputs, markers, locks, signals), cli
                   (the CLI error scheme), resources (memory, cores), plotting (the one style), formatting
    cli            the `rivervalley` command
    testing/       property-testing kit for merge code (hypothesis strategies, pytest plugin)
"""
