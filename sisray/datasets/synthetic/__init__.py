"""The built-in synthetic benchmark: procedural street scenes in a game-like and a photo-like domain.

Both domains share one scene model (a straight street seen by a pinhole camera: road, sidewalks,
facades, walls, fences, hedges, trees, poles with signs and lights, people and cars standing on the
ground). They differ the way GTA5 and Cityscapes differ:

- source (written in the GTA5 layout): flat saturated colours, simple shading, sharp edges, a
  wide-angle camera;
- target (written in the Cityscapes layout, train + val): photographic textures from scikit-image's
  bundled photos, other colour statistics, blur, sensor noise, an ego-vehicle hood, and a longer
  focal length (`zoom`), so objects appear 1.5-2x larger: the scale gap that LSE is about.

Every image is a pure function of (seed, domain, index), so the set does not depend on the number
of processes generating it. `SyntheticSpec.look` renders other target domains from the same scenes
(dusk, fog and rain, another camera); `SUITE` is the set of target domains the ablation runs.

The package: `scene` (scene model, `SyntheticSpec`), `render` (geometry and the two looks), `looks`
(the suite's other target domains), `write`
(`generate`: the layouts on disk), `loaders` (`SyntheticSource`, `SyntheticTarget`, `describe`).
"""

from sisray.datasets.synthetic.loaders import SyntheticSource, SyntheticTarget, describe, require_complete
from sisray.datasets.synthetic.render import render
from sisray.datasets.synthetic.scene import CLASSES, SyntheticSpec
from sisray.datasets.synthetic.write import MANIFEST, SUITE, generate, generate_suite

__all__ = ["CLASSES", "MANIFEST", "SUITE", "SyntheticSource", "SyntheticSpec", "SyntheticTarget", "describe",
           "generate", "generate_suite", "render", "require_complete"]
