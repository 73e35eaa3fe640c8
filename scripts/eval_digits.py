#!/usr/bin/env python
"""Score the embedded digits models: classifier accuracy of guided samples and FD in classifier features.

    python scripts/eval_digits.py --model digits-eps --sampler unipc --steps 20 --guidance-scale 3
"""

from __future__ import annotations

import argparse
import json

from _args import count  # noqa: E402 - scripts/ is on sys.path when run as a script

from fewstep._checks import check_number
from fewstep.bench.digits_eval import evaluate_digits
from fewstep.pipelines import load_default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits-eps", choices=["digits-eps", "digits-flow"],
                        help="embedded generator to score (digits-mr: scripts/bench_mrs.py)")
    parser.add_argument("--sampler", default="unipc", help="registered sampler name (default unipc)")
    parser.add_argument("--steps", type=count(1), nargs="+", default=[20], help="NFEs to score (default 20)")
    parser.add_argument("--guidance-scale", type=float, default=3.0, help="CFG scale (default 3)")
    parser.add_argument("--num-per-class", type=count(2), default=100,
                        help="samples per digit class, >= 2 (the Frechet distance needs two; default 100)")
    parser.add_argument("--seed", type=count(0), default=0, help="seed of the first sample's noise (default 0)")
    args = parser.parse_args()
    # every value is checked before anything runs (an unknown sampler, one that does not fit the model or cannot
    # take a step count, a NaN scale): one line, exit 2 -- and a ValueError of the evaluation itself stays one
    try:
        check_number("guidance_scale", args.guidance_scale, 0.0)
        pipe = load_default(args.model, sampler=args.sampler)
        for steps in args.steps:
            pipe.scheduler.set_timesteps(steps)
    except ValueError as exc:
        parser.error(str(exc))
    classifier = load_default("digits-classifier")
    for steps in args.steps:
        quality = evaluate_digits(pipe, classifier, args.num_per_class, steps, args.guidance_scale, args.seed)
        print(json.dumps({"model": args.model, "sampler": args.sampler, **quality.as_dict()}))


if __name__ == "__main__":
    main()
