"""3-D convolutional against MLP encoders/decoders on the simulated volume design.

Simulates ``--design volume`` (MNI152-based, ``--voxel-mm`` voxels), fits the ``inva`` preset
with MLPs and the ``inva-conv3d`` preset with the same training overrides, and reports test MSE
(and its ratio to the oracle), calibrated coverage at 0.9, CRPS and fit time. Prints a table
and a final JSON line.

    python benchmarks/conv3d.py [--subjects 200] [--voxel-mm 6] [--epochs 30]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from inva_pyro import Cohort, InVA, load_preset
from inva_pyro.data.simulate import write_cohort


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=200)
    parser.add_argument("--voxel-mm", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_cohort(Path(tmp) / "cohort", "volume", args.subjects, args.seed, voxel_mm=args.voxel_mm)
        cohort = Cohort.from_dir(folder, seed=args.seed)
        for preset_name in ("inva", "inva-conv3d"):
            preset = load_preset(preset_name)
            preset.training.epochs, preset.training.patience = args.epochs, args.patience
            preset.prediction.num_samples = args.samples
            start = time.perf_counter()
            model = InVA(preset).fit(cohort.train, cohort.val, seed=args.seed, progress=False)
            fit_s = time.perf_counter() - start
            test = cohort.test
            metrics = model.predict(test, seed=args.seed).metrics(truth_mean=test.truth_mean, truth_sd=test.truth_sd)
            rows.append({"preset": preset_name, "network": preset.model.network, "mse": metrics["mse"],
                         "mse_over_oracle": metrics["mse"] / metrics["oracle_mse"],
                         "coverage_0.9": metrics["coverage"]["0.9"], "crps": metrics["crps"], "fit_s": fit_s,
                         "epochs": len(model.history["epoch"]), "features": int(test.outcome.shape[1])})
    print(f"{'preset':<13}{'MSE':>8}{'/oracle':>9}{'cov 0.9':>9}{'CRPS':>8}{'fit s':>8}{'epochs':>8}")
    for r in rows:
        print(f"{r['preset']:<13}{r['mse']:>8.4f}{r['mse_over_oracle']:>9.3f}{r['coverage_0.9']:>9.3f}"
              f"{r['crps']:>8.4f}{r['fit_s']:>8.0f}{r['epochs']:>8}")
    print(json.dumps({"subjects": args.subjects, "voxel_mm": args.voxel_mm, "results": rows}))


if __name__ == "__main__":
    main()
