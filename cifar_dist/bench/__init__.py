"""Throughput benchmark: images/s per device, MFU, and the speed-up over a plain PyTorch loop.

    cifar-dist bench --out runs/bench --compile off,on --precision fp32,bf16 --channels-last off,on
    cifar-dist bench --loader-only --loaders torch,gpu,ffcv --workers 0,2
    accelerate launch --config_file launch/cpu.yaml --num_processes 2 -m cifar_dist.bench --out runs/bench2

Each row runs the framework's own training step (``step.train_step``) on the
configured model, prepared by the same function as training
(``parts.prepare_model``), followed by the same control work as the training
loop (the BatchNorm/flag collective, a host read every ``CONTROL_EVERY``
steps). Warm-up steps (and compilation) are not timed; each repeat times
``--steps`` steps between two device synchronizations (throughput, as in
training), and each figure is the median over ``--repeats`` repeats. Every
compiled row starts from a fresh compile state and reports the graphs it
compiled; every row reports the precision it ran in. With several processes
each row is also run by rank 0 alone, which gives the scaling efficiency.

Modules, each importing only those listed before it: ``args`` (the command
line), ``timing`` (the clock and the figures), ``baseline`` (the plain loop),
``rows`` (one row of the matrix), ``table`` (bench.md, bench.png), ``run``
(the whole benchmark).
"""
