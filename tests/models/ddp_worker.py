"""Train STEvs and CoxFormer spatial with ``devices`` CPU processes; used by ``test_ddp.py``.

Run as ``python ddp_worker.py SLIDES_DIR OUT_DIR DEVICES SEED``. With ``DEVICES > 1`` Lightning's
DDP launcher starts ranks 1.. by running this same command again (gloo on the CPU); every rank
trains on its shard of each global batch (per-process batch = global batch / DEVICES) and
records what it holds in ``OUT_DIR/rank<r>.json``: a digest of its final weights, its metric
history, and the number of validation spots each epoch's STEvs metric was computed from. The
models are saved with ``save()`` by every rank (only rank 0 may write) and predict the second
section on rank 0.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

GLOBAL_BATCH = 16  # STEvs spots per optimiser step, over all processes
EPOCHS = 15


def digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state (names, shapes and float32 bytes), equal iff the weights are."""
    hasher = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        hasher.update(name.encode())
        hasher.update(value.detach().cpu().float().contiguous().numpy().tobytes())
    return hasher.hexdigest()


def main(slides_dir: Path, out: Path, devices: int, seed: int) -> None:
    torch.set_num_threads(1)
    import stinfer.models.stevs as stevs_module
    from stinfer.io.h5ad import read_h5ad_slide
    from stinfer.metrics import per_gene_pearson
    from stinfer.models import create_model
    from stinfer.train import global_rank

    first = read_h5ad_slide(slides_dir / "section0.h5ad")
    second = read_h5ad_slide(slides_dir / "section1.h5ad")
    genes = list(first.var_names[:8])
    embeddings = np.load(slides_dir / "embeddings.npz")
    table = pd.DataFrame(embeddings["values"], index=embeddings["genes"])

    validation_rows: list[int] = []  # spots behind each epoch's val/pcc_median on this rank
    pearson = stevs_module.per_gene_pearson

    def recording_pearson(predicted, observed):
        validation_rows.append(int(predicted.shape[0]))
        return pearson(predicted, observed)

    stevs_module.per_gene_pearson = recording_pearson

    training_spots: dict[int, int] = {}  # STEvs spots this rank trained on, by epoch
    training_step = stevs_module.STEvsTask.training_step

    def counting_step(task, batch, batch_idx):
        epoch = task.current_epoch
        training_spots[epoch] = training_spots.get(epoch, 0) + len(batch[1])
        return training_step(task, batch, batch_idx)

    stevs_module.STEvsTask.training_step = counting_step

    import stinfer.models.coxformer_spatial as coxformer_module

    training_genes: list[int] = []  # CoxFormer training genes this rank drew in its first epoch
    coxformer_step = coxformer_module.CoxFormerSpatialTask.training_step

    def recording_step(task, batch, batch_idx):
        if task.current_epoch == 0:
            training_genes.extend(int(gene) for gene in batch[0])
        return coxformer_step(task, batch, batch_idx)

    coxformer_module.CoxFormerSpatialTask.training_step = recording_step

    distributed = {"accelerator": "cpu", "devices": devices, "progress_bar": False, "seed": seed}
    if devices > 1:
        distributed["strategy"] = "ddp"
    stevs = create_model(
        "stevs",
        [first],
        genes,
        preset="fast",
        training={
            "test_time_augmentation": False,
            "batch_size": GLOBAL_BATCH // devices,
        },
        trainer={**distributed, "max_epochs": EPOCHS, "swa_epoch_start": 0.5},
    )
    stevs_result = stevs.train()
    coxformer = create_model(
        "coxformer_spatial",
        first,
        table,
        preset="fast",
        train_genes=list(first.var_names[:16]),
        module={
            "d_model": 32,
            "feedforward_dim": 64,
            "location_dim": 32,
            "image_dim": 32,
            "head_width": 32,
            "gene_hidden_dim": 32,
            "n_heads": 4,
            "rank": 8,
        },
        training={
            "batch_genes": 8 // devices,
            "min_steps_per_epoch": 2,
            "min_spot_fraction": 0.0,
            "patience": 2,
        },
        trainer={**distributed, "max_epochs": 60},
    )
    coxformer_result = coxformer.train()

    rank = global_rank()
    stevs.save(out / "stevs_run")
    coxformer.save(out / "coxformer_run")
    record = {
        "rank": rank,
        "world_size": stevs_result.world_size,
        "stevs_digest": digest(stevs.module),
        "coxformer_digest": digest(coxformer.module),
        "stevs_history": stevs_result.history,
        "coxformer_history": coxformer_result.history,
        "coxformer_stopped_epoch": coxformer.early_stopping.stopped_epoch,
        "coxformer_best_epoch": coxformer.early_stopping.best_epoch,
        "validation_rows": validation_rows,
        "training_spots_first_epoch": training_spots[0],
        "coxformer_genes_first_epoch": training_genes,
        "n_validation_spots": len(
            stevs_module.validation_split(
                stevs.train_slides, stevs.config.training.val_fraction, 0
            )[1]
        ),
    }
    if rank == 0:  # what was saved (by rank 0 alone) is what the ranks hold
        from stinfer.models import load

        record["stevs_saved_digest"] = digest(load(out / "stevs_run").module)
        record["coxformer_saved_digest"] = digest(load(out / "coxformer_run").module)
        correlations, _ = per_gene_pearson(np.asarray(stevs.predict(second).X), second[:, genes].X)
        record["stevs_test_pcc"] = float(np.nanmedian(correlations))
        query = list(first.var_names[16:20])
        imputed = coxformer.predict(second, query)
        correlations, _ = per_gene_pearson(np.asarray(imputed.X), second[:, query].X)
        record["coxformer_test_pcc"] = float(np.nanmedian(correlations))
    (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
