"""Rendering a scene: its geometry (material, depth, surface coordinates per pixel), then the look of
a domain: game-like flat colours for the source, photo-like textures, haze, colour statistics, blur
and noise for the target."""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

import cv2
import numpy as np

from sisray.datasets.synthetic.looks import LOOK_OF
from sisray.datasets.synthetic.scene import (GAP, LABEL_ID, MATERIAL, MATERIALS, SOURCE_RGB, TARGET_RGB, Camera,
                                             Layer, Part, Scene, SyntheticSpec, sample_scene)

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
            np.copyto(getattr(self, name)[region], value, casting="unsafe", where=mask)  # as `view[mask] = value` casts
        np.copyto(self.tint[region], tint, casting="unsafe", where=mask[..., None])


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
    centre_line = (ax < 0.08) & (np.mod(z + scene.travel, 6.0) < 3.0)  # painted on the street, not the camera
    edge_line = (ax > scene.road_half - 0.25) & (ax < scene.road_half - 0.12)
    material = np.where((material == MATERIAL["road"]) & (centre_line | edge_line), MATERIAL["marking"], material)
    z = np.broadcast_to(z, material.shape)
    cv.paint(region, np.ones(material.shape, bool), z, material, x, z + scene.travel, 1.0, 1.0 - 0.15 * np.exp(-z / 20))


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


def _draw_layer(cv: Canvas, layer: Layer, pitch: float, side_shade: float, travel: float) -> None:
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
    s = np.broadcast_to(z[None, :] + travel, mask.shape)  # along the facade, fixed to the street
    material = _facade_material(np.broadcast_to(material[None, :], mask.shape), z + travel, t, pitch)
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
        _draw_layer(cv, layer, scene.window_pitch, 0.8 if layer.side < 0 else 1.0, scene.travel)
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
    rgb = SOURCE_RGB[cv.material] * cv.tint * cv.shade[..., None] * lighting
    return np.clip(rgb, 0, 255).astype(np.uint8)


def shade_target(cv: Canvas, rng: np.random.Generator, gap: float = 1.0) -> np.ndarray:
    """Photo-like: textured surfaces, haze, other colour statistics, blur and sensor noise; each
    effect scaled by `gap` (0: the source's look). The random draws do not depend on `gap`."""
    def toward(plain, photo):  # the source's value at gap 0, the photo-like value at gap 1
        return plain + gap * (photo - plain)

    detail = np.ones(cv.material.shape, np.float32)
    for index in np.unique(cv.material):
        _, _, _, texture, strength, px_per_m = MATERIALS[list(MATERIAL)[index]]
        tex = _texture(texture)
        mask = cv.material == index
        offset = rng.uniform(0, 512, 2)
        iy = (cv.t[mask] * px_per_m + offset[0]).astype(np.int64) % tex.shape[0]
        ix = (cv.s[mask] * px_per_m + offset[1]).astype(np.int64) % tex.shape[1]
        detail[mask] = 1 + gap * strength * (tex[iy, ix] - 1)
    rgb = toward(SOURCE_RGB, TARGET_RGB)[cv.material] * cv.tint * (detail * cv.shade)[..., None]
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


def target_camera(spec: SyntheticSpec, scene: Scene, width: int, height: int, rng: np.random.Generator) -> Camera:
    """The target's camera: the benchmark's (a longer focal length than the source's), or for the
    "camera" look another mounting: 2.2-3 m up (a bus or a van), tilted down, a shorter focal length."""
    zoom, horizon, x0 = rng.uniform(*spec.zoom), rng.uniform(0.42, 0.5), rng.uniform(-0.5, 0.5) * scene.road_half
    if spec.look != "camera":
        return Camera(width, height, focal=0.5 * width * zoom, horizon=height * horizon, x0=x0)
    return Camera(width, height, focal=0.5 * width * rng.uniform(1.0, 1.3), horizon=height * rng.uniform(0.3, 0.4),
                  x0=x0, elevation=rng.uniform(2.2, 3.0))


DRIVE_STEP = 1.5  # metres the camera moves between two frames of a drive (SyntheticSpec.drives)


def frames_per_drive(spec: SyntheticSpec) -> int:
    return -(-spec.n_target_train // spec.drives)


def advance(scene: Scene, distance: float) -> Scene:
    """The scene seen from `distance` metres further down the street: everything comes closer."""
    layers = [replace(layer, starts=layer.starts - distance, ends=layer.ends - distance) for layer in scene.layers]
    things = [replace(thing, z=thing.z - distance) for thing in scene.things]
    return replace(scene, layers=layers, things=things, far_z=scene.far_z - distance, travel=scene.travel + distance)


def render(spec: SyntheticSpec, domain: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 (H, W, 3), Cityscapes label IDs uint8 (H, W)) of one image; a pure function. The
    look of the target (`spec.look`) changes neither the source nor the target's scenes. With
    `spec.drives`, target-train image i is frame i % F of drive i // F (F frames a drive)."""
    code = {"source": 0, "train": 1, "val": 2}[domain]
    drive, frame = divmod(index, frames_per_drive(spec)) if spec.drives and domain == "train" else (index, None)
    rng = np.random.default_rng([spec.seed, code, drive])
    scene = sample_scene(rng, "street" if domain == "source" else spec.scenery)
    if domain == "source":
        width, height = spec.source_size
        cam = Camera(width, height, focal=0.5 * width, horizon=height * rng.uniform(0.42, 0.5),
                     x0=rng.uniform(-0.5, 0.5) * scene.road_half)
        cv = render_geometry(scene, cam, ego_hood=False)
        return shade_source(cv, rng), LABEL_ID[cv.material]
    cam = target_camera(spec, scene, *spec.target_size, rng)
    if frame is not None:  # a frame of a drive: the camera moved on; light and noise are the frame's own
        scene, rng = advance(scene, frame * DRIVE_STEP), np.random.default_rng([spec.seed, code, drive, frame])
    cv = render_geometry(scene, cam, ego_hood=spec.look != "camera")
    rgb = shade_target(cv, rng, spec.appearance_gap)
    if spec.look in LOOK_OF:
        rgb = LOOK_OF[spec.look](rgb, cv, rng)
    return rgb, LABEL_ID[cv.material]
