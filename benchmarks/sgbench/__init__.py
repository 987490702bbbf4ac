"""sessionguard's benchmarks, one module per section (run them with ``benchmarks/run``).

Every figure is a ratio against a baseline measured in the same run, shown
next to the absolute numbers: the machine is shared and noisy, so only
same-run ratios compare between runs. Nothing here is tuned to a target;
``report`` names each target MET or MISSED from the numbers as measured.
"""
