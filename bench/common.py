"""What several benches share: a generated benchmark of a given size, the default's source model or
a stand-in, and the small settings of their `--tiny` smoke runs (the tests run every bench that way)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "synthetic.yaml"

# A bench's --tiny run: small images, a selection that picks from a handful of images (class-wise
# selection needs ~100 target images per round), two patches per image, one epoch per round, no
# target BatchNorm passes (two Ray Data start-ups fewer per job).
TINY = ["data.source.size=[64, 36]", "data.target.size=[64, 32]", "lse.selection=global", "lse.p0=0.5",
        "lse.p_max=0.5", "lse.patches_per_image=2", "train.epochs_per_round=1", "train.batch_size=2",
        "lse.target_bn=false"]


def make_set(folder: Path, target_train: int, target_val: int = 1, source: int = 1) -> Path:
    """A synthetic benchmark (seed 1) in `folder` with that many images per split."""
    from sisray.datasets.synthetic import SyntheticSpec, generate

    generate(folder, SyntheticSpec(seed=1, n_source=source, n_target_train=target_train, n_target_val=target_val))
    return folder


def source_model(given: str | None) -> str:
    """The model file a bench measures with: the one given, else the default's source model (the
    shipped one, sisray/weights), read as a file: the bench's generated sets are not its source set."""
    from sisray.weights import checkpoint_location

    return checkpoint_location(given or "shipped:synthetic")


def random_checkpoint(path: Path) -> str:
    """The default model, randomly initialised (seed 0), saved at `path`: a source model for
    measuring speed only (the size of a patch set depends on the weights; the time per image does not)."""
    import torch

    from sisray.config import load_config
    from sisray.labels import NUM_CLASSES
    from sisray.models import build_model

    cfg = load_config(CONFIG)
    torch.manual_seed(0)
    torch.save(build_model(cfg.model.name, NUM_CLASSES, cfg.model.width, "random").state_dict(), path)
    return str(path)
