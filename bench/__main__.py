"""``python -m bench``: see bench/run.py."""

from bench.run import main

# guarded: the processes torch.multiprocessing.spawn starts (vp_ce) import this module again
if __name__ == "__main__":
    raise SystemExit(main())
