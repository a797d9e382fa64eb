"""The benchmark's scene model: materials and their classes, what to generate (`SyntheticSpec`), and
a random street scene (a straight street seen by a pinhole camera: road, sidewalks, facades, walls,
fences, hedges, trees, poles with signs and lights, people and cars standing on the ground)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sisray.errors import DatasetError
from sisray.labels import train_id

GENERATOR_VERSION = 1
LOOKS = ("day", "dusk", "fog", "camera")  # the target domains the generator renders (SyntheticSpec.look)
SCENERIES = ("street", "rural")  # what the target's scenes hold (SyntheticSpec.scenery); the source is always "street"

# ------------------------------------------------------------------------------- materials
# name: (Cityscapes label ID, source RGB, target RGB, target texture, texture strength, texture px/m)
MATERIALS = {
    "sky":        (23, (120, 180, 250), (175, 190, 205), "moon", 0.25, 1.5),
    "road":       (7, (70, 70, 75), (105, 100, 98), "gravel", 0.55, 60.0),
    "marking":    (7, (240, 240, 240), (195, 192, 185), "gravel", 0.3, 60.0),
    "sidewalk":   (8, (200, 160, 175), (150, 142, 135), "brick", 0.45, 45.0),
    "terrain":    (22, (150, 200, 80), (125, 120, 75), "grass", 0.7, 80.0),
    "building":   (11, (175, 95, 60), (150, 128, 110), "brick", 0.55, 35.0),
    "window":     (11, (60, 110, 160), (70, 78, 85), "moon", 0.45, 30.0),
    "wall":       (12, (190, 185, 150), (158, 155, 145), "gravel", 0.35, 40.0),
    "fence":      (13, (150, 110, 60), (120, 112, 100), "grass", 0.5, 60.0),
    "pole":       (17, (120, 120, 130), (95, 95, 98), "gravel", 0.25, 90.0),
    "sign":       (20, (230, 230, 120), (200, 200, 195), "camera", 0.35, 150.0),
    "light":      (19, (30, 30, 30), (48, 48, 45), "gravel", 0.3, 120.0),
    "lamp":       (19, (255, 60, 40), (150, 120, 90), "moon", 0.3, 120.0),
    "vegetation": (21, (50, 160, 50), (70, 92, 48), "grass", 0.85, 70.0),
    "trunk":      (21, (110, 70, 30), (75, 65, 55), "brick", 0.4, 120.0),
    "skin":       (24, (255, 200, 160), (190, 155, 130), "camera", 0.2, 150.0),
    "cloth":      (24, (255, 255, 255), (255, 255, 255), "astronaut", 0.35, 120.0),
    "car":        (26, (255, 255, 255), (255, 255, 255), "coffee", 0.15, 60.0),
    "glass":      (26, (30, 40, 60), (52, 58, 66), "moon", 0.5, 60.0),
    "wheel":      (26, (20, 20, 20), (32, 32, 34), "gravel", 0.3, 120.0),
    "ego":        (1, (0, 0, 0), (35, 36, 40), "gravel", 0.2, 150.0),
}
MATERIAL = {name: i for i, name in enumerate(MATERIALS)}
GAP = 255  # "no surface" in facade layers
LABEL_ID = np.array([m[0] for m in MATERIALS.values()], dtype=np.uint8)
SOURCE_RGB = np.array([m[1] for m in MATERIALS.values()], dtype=np.float32)
TARGET_RGB = np.array([m[2] for m in MATERIALS.values()], dtype=np.float32)

# The 13 trainIds the benchmark renders: its evaluation classes.
CLASSES = tuple(sorted({train_id(n) for n in (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "car")}))

_CAR_COLOURS = np.array([(200, 30, 30), (30, 60, 200), (230, 230, 230), (20, 20, 25), (240, 200, 0),
                         (40, 150, 60), (150, 150, 160), (120, 20, 120)], dtype=np.float32) / 255
_CLOTH_COLOURS = np.array([(220, 40, 40), (40, 80, 220), (240, 240, 240), (30, 30, 30), (250, 160, 0),
                           (60, 170, 80), (140, 90, 50), (200, 80, 200)], dtype=np.float32) / 255


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate. Sizes are the written (full) resolutions; loaders resize to the working size."""
    seed: int = 0
    n_source: int = 600
    n_target_train: int = 300
    n_target_val: int = 100
    source_size: tuple[int, int] = (384, 216)  # GTA5-like 16:9
    target_size: tuple[int, int] = (512, 256)  # Cityscapes-like 2:1
    zoom: tuple[float, float] = (1.6, 2.1)  # target focal length / source focal length
    # How far the target's look departs from the source's: 0 = the source's colours, no texture, haze,
    # blur or noise (only the scale gap is left); 1 = the full photo-like look.
    appearance_gap: float = 1.0
    # The target domain's kind (render.LOOKS): "day" (the benchmark), "dusk" (low light, a blue cast,
    # sensor noise, lit lamps and windows), "fog" (short visibility, rain streaks) or "camera" (another
    # mounting: higher, tilted down, a shorter focal length, no ego hood).
    look: str = "day"
    # 0: every target-train image shows a scene of its own; k: the target-train images are consecutive
    # frames of k drives (video: neighbouring frames nearly alike), 1.5 m apart
    drives: int = 0
    # What the target's scenes hold: "street" (the source's town streets) or "rural" (a country road:
    # narrow, verges of grass, hedges and fences, few buildings, cars and people: other class proportions)
    scenery: str = "street"
    version: int = GENERATOR_VERSION

    def validate(self) -> None:
        for name in ("n_source", "n_target_train", "n_target_val"):
            if getattr(self, name) < 1:
                raise DatasetError(f"synthetic benchmark: {name} = {getattr(self, name)}: expected at least 1")
        for name in ("source_size", "target_size"):
            w, h = getattr(self, name)
            if w < 32 or h < 32:
                raise DatasetError(f"synthetic benchmark: {name} = {w}x{h}: expected at least 32x32")
        if not 1.0 <= self.zoom[0] <= self.zoom[1]:
            raise DatasetError(f"synthetic benchmark: zoom = {self.zoom}: expected 1 <= low <= high")
        if not 0.0 <= self.appearance_gap <= 1.0:
            raise DatasetError(f"synthetic benchmark: appearance_gap = {self.appearance_gap}: expected 0 to 1")
        if not 0 <= self.drives <= self.n_target_train:
            raise DatasetError(f"synthetic benchmark: drives = {self.drives}: expected 0 to n_target_train "
                               f"({self.n_target_train})")
        if self.look not in LOOKS:
            raise DatasetError(f"synthetic benchmark: look = {self.look!r}: expected one of {', '.join(LOOKS)}")
        if self.scenery not in SCENERIES:
            raise DatasetError(f"synthetic benchmark: scenery = {self.scenery!r}: expected one of "
                               f"{', '.join(SCENERIES)}")



# ------------------------------------------------------------------------------- scene model

@dataclass
class Camera:
    width: int
    height: int
    focal: float  # pixels
    horizon: float  # row of the horizon
    x0: float  # lateral position on the street (m)
    elevation: float = 1.5  # camera height above the ground (m)

    @property
    def cx(self) -> float:
        return self.width / 2

    def column(self, x: float, z: float) -> float:
        return self.cx + self.focal * (x - self.x0) / z

    def row(self, y: float, z: float) -> float:
        return self.horizon + self.focal * (self.elevation - y) / z


@dataclass
class Part:
    """A flat shape on a vertical plane facing the camera: rect, ellipse or trapezoid (top_scale)."""
    shape: str
    xc: float
    y0: float
    y1: float
    half_width: float
    material: str
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    top_scale: float = 1.0


@dataclass
class Thing:
    z: float
    parts: list[Part]


@dataclass
class Layer:
    """A facade plane at lateral distance `x` on one side, cut into segments along the street."""
    side: int
    x: float
    starts: np.ndarray
    ends: np.ndarray
    heights: np.ndarray
    materials: np.ndarray  # material index, or GAP
    tints: np.ndarray  # (n, 3)


@dataclass
class Scene:
    road_half: float
    sidewalk: tuple[float, float]  # left, right widths
    layers: list[Layer]
    far_z: float
    far_heights: np.ndarray  # far facade blocks across the street end
    far_edges: np.ndarray
    far_over_road: bool
    things: list[Thing] = field(default_factory=list)
    window_pitch: float = 3.0
    travel: float = 0.0  # metres the camera has moved down the street (render.advance)


def _tint(rng: np.random.Generator, spread: float = 0.15) -> tuple[float, float, float]:
    return tuple(float(v) for v in np.clip(1 + rng.normal(0, spread, 3), 0.6, 1.4))


def _segments(rng, length, kinds, probs, heights):
    starts, ends, hs, mats = [], [], [], []
    z = rng.uniform(-5, 2)
    while z < length:
        seg = rng.uniform(6, 25)
        kind = kinds[rng.choice(len(kinds), p=probs)]
        starts.append(z)
        ends.append(z + seg)
        lo, hi = heights[kind]
        hs.append(rng.uniform(lo, hi))
        mats.append(GAP if kind == "gap" else MATERIAL[kind])
        z += seg
    n = len(starts)
    return (np.array(starts), np.array(ends), np.array(hs), np.array(mats, dtype=np.int64),
            np.array([_tint(rng, 0.15) for _ in range(n)], dtype=np.float32))


def _car(rng, x, z) -> Thing:
    w, h = rng.uniform(1.7, 2.0), rng.uniform(1.4, 1.75)
    colour = tuple(_CAR_COLOURS[rng.integers(len(_CAR_COLOURS))] * np.asarray(_tint(rng, 0.08)))
    parts = [Part("rect", x, 0.25, 0.6 * h, w / 2, "car", colour),
             Part("trapezoid", x, 0.6 * h, h, 0.45 * w, "car", colour, top_scale=0.75),
             Part("trapezoid", x, 0.64 * h, 0.95 * h, 0.4 * w, "glass", top_scale=0.72)]
    parts += [Part("ellipse", x + dx * w, 0.0, 0.66, 0.3, "wheel") for dx in (-0.32, 0.32)]
    return Thing(z, parts)


def _person(rng, x, z) -> Thing:
    h = rng.uniform(1.55, 1.95)
    top = tuple(_CLOTH_COLOURS[rng.integers(len(_CLOTH_COLOURS))])
    legs = tuple(_CLOTH_COLOURS[rng.integers(len(_CLOTH_COLOURS))] * 0.7)
    parts = [Part("rect", x + dx * h, 0.0, 0.47 * h, 0.045 * h, "cloth", legs) for dx in (-0.055, 0.055)]
    parts += [Part("rect", x + dx * h, 0.5 * h, 0.8 * h, 0.03 * h, "cloth", top) for dx in (-0.145, 0.145)]
    parts += [Part("rect", x, 0.45 * h, 0.82 * h, 0.11 * h, "cloth", top),
              Part("ellipse", x, 0.82 * h, 0.98 * h, 0.062 * h, "skin", _tint(rng, 0.1))]
    return Thing(z, parts)


def _pole(rng, x, z) -> Thing:
    kind = rng.choice(["sign", "light", "plain"], p=[0.45, 0.25, 0.3])
    hw = rng.uniform(0.06, 0.1)
    if kind == "sign":
        top = rng.uniform(2.6, 3.4)
        size = rng.uniform(0.55, 0.8)
        shape = ["ellipse", "rect", "trapezoid"][rng.integers(3)]
        plate = Part(shape, x, top - size, top, size / 2, "sign", _tint(rng, 0.1), top_scale=0.0)
        return Thing(z, [Part("rect", x, 0.0, top - 0.1, hw, "pole"), plate])
    if kind == "light":
        top = rng.uniform(3.4, 4.8)
        parts = [Part("rect", x, 0.0, top - 0.5, hw, "pole"), Part("rect", x, top - 0.95, top, 0.17, "light")]
        parts += [Part("ellipse", x, top - 0.3 * k - 0.27, top - 0.3 * k - 0.07, 0.09, "lamp") for k in range(3)]
        return Thing(z, parts)
    return Thing(z, [Part("rect", x, 0.0, rng.uniform(5.0, 8.0), hw, "pole")])


def _tree(rng, x, z) -> Thing:
    r = rng.uniform(1.2, 2.6)
    trunk = rng.uniform(1.8, 3.0)
    parts = [Part("rect", x, 0.0, trunk + 0.3, rng.uniform(0.1, 0.2), "trunk"),
             Part("ellipse", x, trunk, trunk + 1.8 * r, r, "vegetation", _tint(rng, 0.1))]
    return Thing(z, parts)


@dataclass(frozen=True)
class Scenery:
    """The draws of a scene kind: sizes in metres, counts, and the chances of each facade segment."""
    road_half: tuple[float, float]
    sidewalk: tuple[float, float]
    front: tuple[float, float, float, float]  # gap, wall, fence, vegetation
    back: tuple[float, float]  # gap, building
    building: tuple[float, float]  # heights
    far_heights: tuple[float, float]
    cars: tuple[int, int]  # drawn from [low, high)
    people: tuple[int, int]
    tree_rows: float  # chance of a row of trees along each side
    tree_spacing: tuple[float, float]
    tree_offset: float  # from the outer edge of the sidewalk: on it (< 0) or in the verge beyond (> 0)


SCENERY = {
    "street": Scenery(road_half=(3.5, 6.5), sidewalk=(1.8, 4.0), front=(0.5, 0.15, 0.2, 0.15), back=(0.2, 0.8),
                      building=(7, 28), far_heights=(8, 30), cars=(2, 9), people=(1, 8), tree_rows=0.5,
                      tree_spacing=(8, 20), tree_offset=-0.6),
    "rural": Scenery(road_half=(2.8, 4.0), sidewalk=(0.3, 1.0), front=(0.25, 0.05, 0.35, 0.35), back=(0.85, 0.15),
                     building=(5, 10), far_heights=(2, 9), cars=(0, 4), people=(0, 3), tree_rows=0.9,
                     tree_spacing=(5, 12), tree_offset=1.5),
}


def sample_scene(rng: np.random.Generator, scenery: str = "street") -> Scene:
    kind = SCENERY[scenery]
    road_half = rng.uniform(*kind.road_half)
    sidewalk = (rng.uniform(*kind.sidewalk), rng.uniform(*kind.sidewalk))
    far_z = rng.uniform(70, 140)
    heights = {"gap": (0, 0), "building": kind.building, "wall": (0.8, 2.2), "fence": (1.0, 1.7),
               "vegetation": (1.2, 3.5)}
    layers = []
    for side, walk in zip((-1, 1), sidewalk):
        kerb = road_half + walk
        front = _segments(rng, far_z, ["gap", "wall", "fence", "vegetation"], list(kind.front), heights)
        back = _segments(rng, far_z, ["gap", "building"], list(kind.back), heights)
        layers.append(Layer(side, kerb + 0.3, *front))
        layers.append(Layer(side, kerb + rng.uniform(0.5, 6.0), *back))
    edges = np.cumsum(np.r_[-120.0, rng.uniform(8, 25, 16)])
    scene = Scene(road_half, sidewalk, layers, far_z, rng.uniform(*kind.far_heights, len(edges) - 1), edges,
                  bool(rng.random() < 0.5), window_pitch=rng.uniform(2.4, 3.6))

    things: list[Thing] = []
    for _ in range(rng.integers(*kind.cars)):
        side = rng.choice([-1, 1])
        lane = side * (road_half - 1.2) if rng.random() < 0.5 else side * road_half * rng.uniform(0.2, 0.6)
        things.append(_car(rng, lane, rng.uniform(4, 0.8 * far_z)))
    for _ in range(rng.integers(*kind.people)):
        side = rng.choice([-1, 1])
        walk = sidewalk[0 if side < 0 else 1]
        on_road = rng.random() < 0.15
        x = rng.uniform(-road_half, road_half) if on_road else side * (road_half + rng.uniform(0.3, max(walk - 0.3, 0.3)))
        things.append(_person(rng, x, rng.uniform(4, 45)))
    for side, walk in zip((-1, 1), sidewalk):
        z = rng.uniform(3, 15)
        while z < 0.9 * far_z:
            things.append(_pole(rng, side * (road_half + 0.35), z))
            z += rng.uniform(12, 30)
        if rng.random() < kind.tree_rows:
            z = rng.uniform(4, 12)
            while z < 0.9 * far_z:
                things.append(_tree(rng, side * (road_half + walk + kind.tree_offset), z))
                z += rng.uniform(*kind.tree_spacing)
    things.sort(key=lambda t: -t.z)  # painter's order, far to near
    scene.things = things
    return scene
