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
of processes generating it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from sisray.datasets.cityscapes import IMAGE_SUFFIX, LABEL_SUFFIX, Cityscapes
from sisray.datasets.gta5 import GTA5
from sisray.errors import DatasetError
from sisray.labels import train_id
from sisray.storage import atomic_write_json

GENERATOR_VERSION = 1
MANIFEST = "SYNTHETIC.json"
PARTIAL_MARKER = ".sisray-synthetic-partial"
TRAIN_CITIES = ("alderby", "brookfield", "corvale")
VAL_CITIES = ("dunmore", "eastwick")
FRAME = 19  # Cityscapes' fine annotations are frame 000019 of each sequence

# ------------------------------------------------------------------------------- materials
# name: (Cityscapes label ID, source RGB, target RGB, target texture, texture strength, texture px/m)
_MATERIALS = {
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
MATERIAL = {name: i for i, name in enumerate(_MATERIALS)}
GAP = 255  # "no surface" in facade layers
_LABEL_ID = np.array([m[0] for m in _MATERIALS.values()], dtype=np.uint8)
_SOURCE_RGB = np.array([m[1] for m in _MATERIALS.values()], dtype=np.float32)
_TARGET_RGB = np.array([m[2] for m in _MATERIALS.values()], dtype=np.float32)

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


def sample_scene(rng: np.random.Generator) -> Scene:
    road_half = rng.uniform(3.5, 6.5)
    sidewalk = (rng.uniform(1.8, 4.0), rng.uniform(1.8, 4.0))
    far_z = rng.uniform(70, 140)
    heights = {"gap": (0, 0), "building": (7, 28), "wall": (0.8, 2.2), "fence": (1.0, 1.7),
               "vegetation": (1.2, 3.5)}
    layers = []
    for side, walk in zip((-1, 1), sidewalk):
        kerb = road_half + walk
        front = _segments(rng, far_z, ["gap", "wall", "fence", "vegetation"], [0.5, 0.15, 0.2, 0.15], heights)
        back = _segments(rng, far_z, ["gap", "building"], [0.2, 0.8], heights)
        layers.append(Layer(side, kerb + 0.3, *front))
        layers.append(Layer(side, kerb + rng.uniform(0.5, 6.0), *back))
    edges = np.cumsum(np.r_[-120.0, rng.uniform(8, 25, 16)])
    scene = Scene(road_half, sidewalk, layers, far_z, rng.uniform(8, 30, len(edges) - 1), edges,
                  bool(rng.random() < 0.5), window_pitch=rng.uniform(2.4, 3.6))

    things: list[Thing] = []
    for _ in range(rng.integers(2, 9)):
        side = rng.choice([-1, 1])
        lane = side * (road_half - 1.2) if rng.random() < 0.5 else side * road_half * rng.uniform(0.2, 0.6)
        things.append(_car(rng, lane, rng.uniform(4, 0.8 * far_z)))
    for _ in range(rng.integers(1, 8)):
        side = rng.choice([-1, 1])
        walk = sidewalk[0 if side < 0 else 1]
        on_road = rng.random() < 0.15
        x = rng.uniform(-road_half, road_half) if on_road else side * (road_half + rng.uniform(0.3, walk - 0.3))
        things.append(_person(rng, x, rng.uniform(4, 45)))
    for side, walk in zip((-1, 1), sidewalk):
        z = rng.uniform(3, 15)
        while z < 0.9 * far_z:
            things.append(_pole(rng, side * (road_half + 0.35), z))
            z += rng.uniform(12, 30)
        if rng.random() < 0.5:
            z = rng.uniform(4, 12)
            while z < 0.9 * far_z:
                things.append(_tree(rng, side * (road_half + walk - 0.6), z))
                z += rng.uniform(8, 20)
    things.sort(key=lambda t: -t.z)  # painter's order, far to near
    scene.things = things
    return scene


# ------------------------------------------------------------------------------- rendering

class Canvas:
    """Per pixel: material, depth, surface coordinates (s, t in metres), tint and shade."""

    def __init__(self, cam: Camera):
        h, w = cam.height, cam.width
        self.cam = cam
        self.material = np.full((h, w), MATERIAL["sky"], dtype=np.uint8)
        self.depth = np.full((h, w), np.inf, dtype=np.float32)
        self.s = np.zeros((h, w), dtype=np.float32)
        self.t = np.zeros((h, w), dtype=np.float32)
        self.tint = np.ones((h, w, 3), dtype=np.float32)
        self.shade = np.ones((h, w), dtype=np.float32)
        self.v = (np.arange(h, dtype=np.float32) + 0.5)[:, None]  # pixel-centre rows
        self.u = (np.arange(w, dtype=np.float32) + 0.5)[None, :]  # pixel-centre columns

    def paint(self, region, mask, depth, material, s, t, tint, shade) -> None:
        mask = mask & (depth <= self.depth[region])
        for name, value in (("depth", depth), ("material", material), ("s", s), ("t", t), ("shade", shade)):
            view = getattr(self, name)[region]
            view[mask] = np.broadcast_to(value, mask.shape)[mask]
        self.tint[region][mask] = np.broadcast_to(tint, mask.shape + (3,))[mask]


def _draw_sky(cv: Canvas) -> None:
    cam = cv.cam
    elevation = np.broadcast_to((cam.horizon - cv.v) / cam.focal, cv.material.shape)
    cv.s[:] = cv.u / cam.focal * 40
    cv.t[:] = elevation * 40
    cv.shade[:] = 1.05 - 0.35 * np.clip(elevation, 0, 1)


def _draw_ground(cv: Canvas, scene: Scene) -> None:
    cam = cv.cam
    rows = int(np.ceil(cam.horizon + 0.5))
    if rows >= cam.height:
        return
    region = (slice(rows, None), slice(None))
    z = cam.focal * cam.elevation / (cv.v[rows:] - cam.horizon)
    x = (cv.u - cam.cx) * z / cam.focal + cam.x0
    ax = np.abs(x)
    kerb = np.where(x < 0, scene.sidewalk[0], scene.sidewalk[1]) + scene.road_half
    material = np.where(ax < scene.road_half, MATERIAL["road"],
                        np.where(ax < kerb, MATERIAL["sidewalk"], MATERIAL["terrain"]))
    centre_line = (ax < 0.08) & (np.mod(z, 6.0) < 3.0)
    edge_line = (ax > scene.road_half - 0.25) & (ax < scene.road_half - 0.12)
    material = np.where((material == MATERIAL["road"]) & (centre_line | edge_line), MATERIAL["marking"], material)
    z = np.broadcast_to(z, material.shape)
    cv.paint(region, np.ones(material.shape, bool), z, material, x, z, 1.0, 1.0 - 0.15 * np.exp(-z / 20))


def _facade_material(material, s_columns, t, pitch):
    """Windows on building facades: a grid of floors and bays (still labelled building).

    `s_columns` is the along-facade coordinate per column (W,), `t` the height per pixel (H, W).
    """
    is_building = material == MATERIAL["building"]
    if not is_building.any():
        return material
    bay = np.mod(s_columns, pitch) / pitch
    floor = np.mod(t, 3.2)
    window = ((bay > 0.3) & (bay < 0.75))[None, :] & (floor > 1.0) & (floor < 2.4) & (t > 3.0)
    return np.where(is_building & window, MATERIAL["window"], material)


def _draw_layer(cv: Canvas, layer: Layer, pitch: float, side_shade: float) -> None:
    cam = cv.cam
    du = cv.u[0] - cam.cx
    with np.errstate(divide="ignore", invalid="ignore"):
        z = cam.focal * (layer.side * layer.x - cam.x0) / du
    idx = np.clip(np.searchsorted(layer.starts, z, side="right") - 1, 0, len(layer.starts) - 1)
    material = layer.materials[idx]
    valid = np.isfinite(z) & (z > 0.5) & (z >= layer.starts[idx]) & (z < layer.ends[idx]) & (material != GAP)
    if not valid.any():
        return
    z = np.where(valid, z, 1.0).astype(np.float32)
    top = cam.horizon - cam.focal * (layer.heights[idx] - cam.elevation) / z
    bottom = cam.horizon + cam.focal * cam.elevation / z
    mask = valid[None, :] & (cv.v >= top[None, :]) & (cv.v < bottom[None, :])
    t = cam.elevation + (cam.horizon - cv.v) * z[None, :] / cam.focal
    s = np.broadcast_to(z[None, :], mask.shape)
    material = _facade_material(np.broadcast_to(material[None, :], mask.shape), z, t, pitch)
    cv.paint((slice(None), slice(None)), mask, s, material, s, t, layer.tints[idx][None, :, :], side_shade)


def _draw_far_facade(cv: Canvas, scene: Scene) -> None:
    cam = cv.cam
    x = (cv.u[0] - cam.cx) * scene.far_z / cam.focal + cam.x0
    idx = np.clip(np.searchsorted(scene.far_edges, x, side="right") - 1, 0, len(scene.far_heights) - 1)
    top = cam.horizon - cam.focal * (scene.far_heights[idx] - cam.elevation) / scene.far_z
    bottom = cam.horizon + cam.focal * cam.elevation / scene.far_z
    columns = np.ones_like(x, bool) if scene.far_over_road else np.abs(x) > scene.road_half + 1.0
    mask = columns[None, :] & (cv.v >= top[None, :]) & (cv.v < bottom)
    t = cam.elevation + (cam.horizon - cv.v) * scene.far_z / cam.focal
    s = np.broadcast_to(x[None, :], mask.shape)
    material = _facade_material(np.full(mask.shape, MATERIAL["building"]), x, t, scene.window_pitch)
    cv.paint((slice(None), slice(None)), mask, np.float32(scene.far_z), material, s, t, 0.9, 0.9)


def _draw_part(cv: Canvas, part: Part, z: float) -> None:
    cam = cv.cam
    c0 = int(np.floor(cam.column(part.xc - part.half_width, z)))
    c1 = int(np.ceil(cam.column(part.xc + part.half_width, z)))
    r0 = int(np.floor(cam.row(part.y1, z)))
    r1 = int(np.ceil(cam.row(part.y0, z)))
    c0, c1, r0, r1 = max(c0, 0), min(c1, cam.width), max(r0, 0), min(r1, cam.height)
    if c0 >= c1 or r0 >= r1:
        return
    region = (slice(r0, r1), slice(c0, c1))
    x = (cv.u[:, c0:c1] - cam.cx) * z / cam.focal + cam.x0 - part.xc
    y = cam.elevation + (cam.horizon - cv.v[r0:r1]) * z / cam.focal
    height = part.y1 - part.y0
    if part.shape == "ellipse":
        ym = (part.y0 + part.y1) / 2
        mask = (x / part.half_width) ** 2 + ((y - ym) / (height / 2)) ** 2 <= 1
    else:
        frac = (y - part.y0) / height
        half = part.half_width * (1 - (1 - part.top_scale) * frac) if part.shape == "trapezoid" else part.half_width
        mask = (np.abs(x) <= half) & (y >= part.y0) & (y <= part.y1)
    mask = np.broadcast_to(mask, (r1 - r0, c1 - c0))
    shade = 0.8 + 0.2 * np.clip((y - part.y0) / max(height, 1e-6), 0, 1)
    cv.paint(region, mask, np.float32(z), MATERIAL[part.material], x, y, np.asarray(part.tint, np.float32), shade)


def _draw_ego_hood(cv: Canvas) -> None:
    cam = cv.cam
    lift = 0.07 * cam.height * (1 - ((cv.u - cam.cx) / (0.75 * cam.width)) ** 2)
    mask = cv.v > cam.height - lift
    cv.paint((slice(None), slice(None)), mask, np.float32(0), MATERIAL["ego"], cv.u / 50, cv.v / 50, 1.0, 0.9)


def render_geometry(scene: Scene, cam: Camera, ego_hood: bool) -> Canvas:
    cv = Canvas(cam)
    _draw_sky(cv)
    _draw_ground(cv, scene)
    _draw_far_facade(cv, scene)
    for layer in scene.layers:
        _draw_layer(cv, layer, scene.window_pitch, 0.8 if layer.side < 0 else 1.0)
    for thing in scene.things:
        if thing.z > 1.0:
            for part in thing.parts:
                _draw_part(cv, part, thing.z)
    if ego_hood:
        _draw_ego_hood(cv)
    return cv


@lru_cache(maxsize=None)
def _texture(name: str) -> np.ndarray:
    """A bundled scikit-image photo as a grey texture with mean 1."""
    import skimage.data

    image = getattr(skimage.data, name)().astype(np.float32)
    if image.ndim == 3:
        image = image[..., :3].mean(axis=2)
    return image / image.mean()


def shade_source(cv: Canvas, rng: np.random.Generator) -> np.ndarray:
    """Game-like: flat colour per material x instance tint x simple shading x the frame's lighting;
    sharp edges."""
    lighting = np.clip(rng.normal(1.0, 0.1, 3), 0.75, 1.25).astype(np.float32) * rng.uniform(0.8, 1.15)
    rgb = _SOURCE_RGB[cv.material] * cv.tint * cv.shade[..., None] * lighting
    return np.clip(rgb, 0, 255).astype(np.uint8)


def shade_target(cv: Canvas, rng: np.random.Generator, gap: float = 1.0) -> np.ndarray:
    """Photo-like: textured surfaces, haze, other colour statistics, blur and sensor noise; each
    effect scaled by `gap` (0: the source's look). The random draws do not depend on `gap`."""
    def toward(plain, photo):  # the source's value at gap 0, the photo-like value at gap 1
        return plain + gap * (photo - plain)

    detail = np.ones(cv.material.shape, np.float32)
    for index in np.unique(cv.material):
        _, _, _, texture, strength, px_per_m = _MATERIALS[list(MATERIAL)[index]]
        tex = _texture(texture)
        mask = cv.material == index
        offset = rng.uniform(0, 512, 2)
        iy = (cv.t[mask] * px_per_m + offset[0]).astype(np.int64) % tex.shape[0]
        ix = (cv.s[mask] * px_per_m + offset[1]).astype(np.int64) % tex.shape[1]
        detail[mask] = 1 + gap * strength * (tex[iy, ix] - 1)
    rgb = toward(_SOURCE_RGB, _TARGET_RGB)[cv.material] * cv.tint * (detail * cv.shade)[..., None]
    haze = 1 - np.exp(-np.minimum(cv.depth, 400) / rng.uniform(120, 250))
    rgb = rgb + (np.array([185, 188, 192], np.float32) - rgb) * (gap * 0.4 * haze)[..., None]
    grey = rgb.mean(axis=2, keepdims=True)
    rgb = grey + toward(1.0, rng.uniform(0.65, 0.9)) * (rgb - grey)  # muted colours
    warm = np.array([rng.uniform(1.0, 1.1), 1.0, rng.uniform(0.82, 0.95)], np.float32)
    rgb = rgb * toward(np.ones(3, np.float32), warm)  # warm balance
    gamma, exposure = toward(1.0, rng.uniform(1.05, 1.3)), toward(1.0, rng.uniform(0.8, 1.05))
    rgb = 255 * (np.clip(rgb, 0, 255) / 255) ** gamma * exposure
    sigma = gap * rng.uniform(0.7, 1.2)
    if sigma > 0:
        rgb = cv2.GaussianBlur(rgb, (0, 0), sigma)
    rgb = rgb + gap * rng.normal(0, rng.uniform(2.0, 5.0), rgb.shape).astype(np.float32)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def render(spec: SyntheticSpec, domain: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 (H, W, 3), Cityscapes label IDs uint8 (H, W)) of one image; a pure function."""
    code = {"source": 0, "train": 1, "val": 2}[domain]
    rng = np.random.default_rng([spec.seed, code, index])
    scene = sample_scene(rng)
    target = domain != "source"
    width, height = spec.target_size if target else spec.source_size
    zoom = rng.uniform(*spec.zoom) if target else 1.0
    cam = Camera(width, height, focal=0.5 * width * zoom, horizon=height * rng.uniform(0.42, 0.5),
                 x0=rng.uniform(-0.5, 0.5) * scene.road_half)
    cv = render_geometry(scene, cam, ego_hood=target)
    rgb = shade_target(cv, rng, spec.appearance_gap) if target else shade_source(cv, rng)
    return rgb, _LABEL_ID[cv.material]


# ------------------------------------------------------------------------------- writing

def _gta5_palette() -> list[int]:
    from cityscapesscripts.helpers.labels import labels

    palette = [0] * 768
    for lab in labels:
        if 0 <= lab.id < 256:
            palette[3 * lab.id: 3 * lab.id + 3] = lab.color
    return palette


def _target_name(split: str, index: int) -> tuple[str, str]:
    cities = TRAIN_CITIES if split == "train" else VAL_CITIES
    city = cities[index % len(cities)]
    return city, f"{city}_{index:06d}_{FRAME:06d}"


def _write_one(args: tuple[SyntheticSpec, str, int, str]) -> None:
    spec, domain, index, out = args
    rgb, ids = render(spec, domain, index)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    if domain == "source":
        name = f"{index + 1:05d}.png"
        cv2.imwrite(os.path.join(out, "source", "images", name), bgr)
        label = Image.fromarray(ids, mode="P")
        label.putpalette(_gta5_palette())
        label.save(os.path.join(out, "source", "labels", name))
    else:
        city, stem = _target_name(domain, index)
        cv2.imwrite(os.path.join(out, "target", "leftImg8bit", domain, city, stem + IMAGE_SUFFIX), bgr)
        cv2.imwrite(os.path.join(out, "target", "gtFine", domain, city, stem + LABEL_SUFFIX), ids)


def _jobs(spec: SyntheticSpec, out: str):
    for domain, count in (("source", spec.n_source), ("train", spec.n_target_train), ("val", spec.n_target_val)):
        for index in range(count):
            yield spec, domain, index, out


def _spec_record(spec: SyntheticSpec) -> dict:
    return json.loads(json.dumps(asdict(spec)))  # tuples -> lists, as stored


def generate(out: str | Path, spec: SyntheticSpec = SyntheticSpec(), processes: int | None = None) -> dict:
    """Write the benchmark to OUT/source (GTA5 layout) and OUT/target (Cityscapes layout).

    A complete set made with the same spec is left as it is (returns its manifest). A set made
    with another spec is refused. A half-written set of ours (marker file present) is removed and
    redone; folders that are not ours are never overwritten. The manifest is written last.
    """
    spec.validate()
    out = Path(out)
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{manifest_path}: unreadable manifest ({exc}); delete {out} to regenerate") from None
        if manifest.get("spec") != _spec_record(spec):
            raise DatasetError(f"{out} holds a synthetic benchmark made with other settings "
                               f"{manifest.get('spec')}; choose another --out or delete {out}")
        return manifest
    ours = (out / PARTIAL_MARKER).exists()
    for sub in ("source", "target"):
        if (out / sub).exists():
            if not ours:
                raise DatasetError(f"{out / sub} exists but is not part of a sisray synthetic benchmark "
                                   f"(no {MANIFEST}); refusing to overwrite it: choose another --out")
            shutil.rmtree(out / sub)
    out.mkdir(parents=True, exist_ok=True)
    (out / PARTIAL_MARKER).write_text("generation in progress; rerun to redo\n")
    for folder in ("source/images", "source/labels"):
        (out / folder).mkdir(parents=True)
    for split, cities in (("train", TRAIN_CITIES), ("val", VAL_CITIES)):
        for city in cities:
            for kind in ("leftImg8bit", "gtFine"):
                (out / "target" / kind / split / city).mkdir(parents=True)

    start = time.perf_counter()
    processes = processes or min(os.cpu_count() or 1, 8)
    jobs = list(_jobs(spec, str(out)))
    if processes > 1:
        with ProcessPoolExecutor(processes) as pool:
            list(pool.map(_write_one, jobs, chunksize=16))
    else:
        for job in jobs:
            _write_one(job)
    manifest = {
        "generator": "sisray.datasets.synthetic",
        "spec": _spec_record(spec),
        "counts": {"source": spec.n_source, "target_train": spec.n_target_train, "target_val": spec.n_target_val},
        "classes": list(CLASSES),
        "seconds": round(time.perf_counter() - start, 2),
    }
    atomic_write_json(manifest_path, manifest)
    (out / PARTIAL_MARKER).unlink()
    return manifest


# ------------------------------------------------------------------------------- loaders

def require_complete(root: str | Path) -> Path:
    """ROOT if it holds a complete benchmark, else a DatasetError saying how to make one."""
    root = Path(root)
    if not (root / MANIFEST).is_file():
        state = "is half-written" if (root / PARTIAL_MARKER).exists() else "holds no synthetic benchmark"
        raise DatasetError(f"{root} {state} (no {MANIFEST}); generate it with: "
                           f"python jobs/make_synthetic.py --out {root}")
    return root


class SyntheticSource(GTA5):
    """The benchmark's source domain, read by the real GTA5 loader from ROOT/source."""
    name = "synthetic"
    eval_classes = CLASSES

    def __init__(self, root, *args, **kwargs):
        super().__init__(require_complete(root) / "source", *args, **kwargs)


class SyntheticTarget(Cityscapes):
    """The benchmark's target domain, read by the real Cityscapes loader from ROOT/target."""
    name = "synthetic"
    splits = ("train", "val")
    eval_classes = CLASSES

    def __init__(self, root, *args, **kwargs):
        super().__init__(require_complete(root) / "target", *args, **kwargs)


# ------------------------------------------------------------------------------- statistics

def _object_heights(label: np.ndarray, class_id: int, min_area: int = 6) -> list[int]:
    """Heights in pixels of the connected regions of one class (a proxy for apparent object size)."""
    count, _, stats, _ = cv2.connectedComponentsWithStats((label == class_id).astype(np.uint8), connectivity=8)
    return [int(h) for h, a in zip(stats[1:, cv2.CC_STAT_HEIGHT], stats[1:, cv2.CC_STAT_AREA]) if a >= min_area]


def describe(dataset, limit: int = 100) -> dict:
    """Class pixel shares, colour statistics and apparent object sizes of (up to `limit`) samples,
    read through the dataset's own loader at its working size."""
    n = min(limit, len(dataset))
    pixels = np.zeros(256, np.int64)
    heights = {"person": [], "car": []}
    rgb_sum, rgb_sq = np.zeros(3), np.zeros(3)
    for i in range(n):
        image, label = dataset[i]
        label = label.numpy()
        pixels += np.bincount(label.ravel(), minlength=256)
        x = image.numpy().reshape(3, -1).astype(np.float64)
        rgb_sum += x.mean(axis=1)
        rgb_sq += (x ** 2).mean(axis=1)
        for name in heights:
            heights[name] += _object_heights(label, train_id(name))
    share = pixels[:19] / max(pixels.sum(), 1)
    mean = rgb_sum / n
    return {
        "images": len(dataset),
        "described": n,
        "size": list(dataset.size),
        "class_share": {c: float(share[c]) for c in CLASSES},
        "ignored_share": float(pixels[255] / max(pixels.sum(), 1)),
        "rgb_mean": [round(float(v), 1) for v in mean],
        "rgb_std": [round(float(v), 1) for v in np.sqrt(np.maximum(rgb_sq / n - mean ** 2, 0))],
        "median_height_px": {k: float(np.median(v)) if v else float("nan") for k, v in heights.items()},
    }
