"""The suite's other target domains: a day image (render.shade_target) made into another light or
weather. Each look reads the image's geometry (the Canvas: material, depth, surface coordinates),
draws from the image's own generator, and leaves the labels alone."""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

from sisray.datasets.synthetic.scene import MATERIAL

if TYPE_CHECKING:
    from sisray.datasets.synthetic.render import Canvas


def dusk(rgb: np.ndarray, cv: Canvas, rng: np.random.Generator) -> np.ndarray:
    """Low light: the day image at a quarter to two fifths of its exposure with a blue cast, lit
    traffic-light lamps and windows that glow, and the sensor noise of a high gain."""
    cast = np.array([rng.uniform(0.7, 0.85), rng.uniform(0.85, 0.95), 1.1], np.float32)
    dark = rgb.astype(np.float32) * rng.uniform(0.22, 0.4) * cast
    lit_window = (cv.material == MATERIAL["window"]) & (
        np.sin(np.floor(cv.s / 1.5) * 12.9898 + np.floor(cv.t / 3.2) * 78.233 + rng.uniform(0, 100)) > 0.2)
    light = np.zeros_like(dark)
    light[lit_window] = (230, 180, 100)
    light[cv.material == MATERIAL["lamp"]] = (255, 90, 50) if rng.random() < 0.5 else (90, 255, 120)
    glow = cv2.GaussianBlur(light, (0, 0), 2.5)
    lit = np.maximum(dark, light) + 0.6 * glow
    gain = rng.uniform(5.0, 10.0)
    noisy = lit + rng.normal(0, gain, lit.shape).astype(np.float32) + rng.normal(0, gain, lit.shape[:2] + (1,))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def fog(rgb: np.ndarray, cv: Canvas, rng: np.random.Generator) -> np.ndarray:
    """Fog and rain: visibility of 25-70 m (the sky and the far street vanish into grey), flat contrast,
    and bright rain streaks."""
    veil = 1 - np.exp(-np.minimum(cv.depth, 1000) / rng.uniform(25, 70))
    grey = np.array([200, 202, 206], np.float32) * rng.uniform(0.85, 1.0)
    foggy = rgb.astype(np.float32) + (grey - rgb) * veil[..., None]
    streaks = np.zeros(rgb.shape[:2], np.float32)
    height, width = streaks.shape
    angle = rng.uniform(-0.3, 0.3)
    for _ in range(int(rng.uniform(0.002, 0.005) * height * width)):
        x, y, length = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(6, 16)
        end = (int(x + length * np.sin(angle)), int(y + length * np.cos(angle)))
        cv2.line(streaks, (int(x), int(y)), end, float(rng.uniform(0.3, 0.7)), 1)
    rainy = foggy + (235 - foggy) * cv2.GaussianBlur(streaks, (0, 0), 0.6)[..., None]
    return np.clip(rainy, 0, 255).astype(np.uint8)


LOOK_OF = {"dusk": dusk, "fog": fog}  # a day image made into another light or weather
