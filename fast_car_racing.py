"""A pixel-exact CarRacing-v3 that renders faster: same observations, rewards and flags as stock.

Stock CarRacing spends ~75% of a step in `_render_road`: a Python loop that rotates and
bounds-checks ~800 polygons (400 grass patches, ~300 road tiles and their kerbs) with one
`pygame.math.Vector2` per vertex, to draw the ~55 that are on screen. It also builds a font object
and renders the score text every frame. This subclass

- keeps the road and grass geometry as float64 arrays, built once per track;
- rotates, scales and bounds-checks all vertices in numpy with the exact arithmetic pygame uses
  (the (cos, sin) pair is taken from pygame itself by rotating (1, 0), so its angle reduction and
  its special cases at multiples of 90 degrees carry over; then x' = c*x - s*y, y' = s*x + c*y);
- makes the same `gfxdraw` calls, with the same float coordinates, for the same visible polygons
  in the same order, reading tile colours at draw time (contacts recolour tiles mid-episode);
- creates the score font once and caches each rendered score string.

The equivalence is checked by `tests/test_fast_car_racing.py` (stock and fast side by side,
full episodes, frames, rewards and flags equal). It was verified on the versions in
`VERIFIED_VERSIONS`; on any other gymnasium or pygame-ce `make_fast_env` warns once and returns
the stock env, so a version that could break equivalence never gives silently different frames.
"""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
from gymnasium.envs.box2d import car_racing as stock
from gymnasium.envs.box2d.car_racing import CarRacing

FAST_ENV_ID = "CarRacingFast-v3"
VERIFIED_VERSIONS = {"gymnasium": ("1.4.0",), "pygame-ce": ("2.5.8",)}


def _installed_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in VERIFIED_VERSIONS:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "missing"
    return found


def equivalence_verified() -> bool:
    """True when the installed gymnasium and pygame-ce are versions the pixel equivalence was verified on."""
    return all(found in VERIFIED_VERSIONS[package] for package, found in _installed_versions().items())


class FastCarRacing(CarRacing):
    """Stock CarRacing with a vectorised `_render_road` and a cached score font."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._road_source = None  # the road_poly list the cached arrays were built from
        self._road_vertices = np.zeros((0, 4, 2))
        self._road_colors: list = []
        grass = [[(stock.GRASS_DIM * x + stock.GRASS_DIM, stock.GRASS_DIM * y + 0),
                  (stock.GRASS_DIM * x + 0, stock.GRASS_DIM * y + 0),
                  (stock.GRASS_DIM * x + 0, stock.GRASS_DIM * y + stock.GRASS_DIM),
                  (stock.GRASS_DIM * x + stock.GRASS_DIM, stock.GRASS_DIM * y + stock.GRASS_DIM)]
                 for x in range(-20, 20, 2) for y in range(-20, 20, 2)]  # stock's order: x outer, y inner
        self._grass_vertices = np.array(grass, dtype=np.float64)  # (400, 4, 2)
        self._score_font = None
        self._score_texts: dict[str, object] = {}
        self.draw_state = True  # False: step() skips drawing its observation (see envs.ActionRepeat)

    def _cache_road(self) -> bool:
        """(Re)build the road arrays when the track changed; False if some polygon is not a quad."""
        if self._road_source is not self.road_poly:
            polys = [poly for poly, _ in self.road_poly]
            if any(len(poly) != 4 for poly in polys):
                return False
            self._road_vertices = np.array(polys, dtype=np.float64).reshape(-1, 4, 2)
            self._road_colors = [color for _, color in self.road_poly]  # the live arrays, recoloured by contacts
            self._road_source = self.road_poly
        return True

    def _transform(self, vertices: np.ndarray, zoom: float, translation, cos_sin) -> tuple[np.ndarray, np.ndarray]:
        """Rotate, scale and shift (N, 4, 2) vertices as stock does per vertex; also the visibility mask."""
        c, s = cos_sin
        x, y = vertices[..., 0], vertices[..., 1]
        screen = np.empty_like(vertices)
        screen[..., 0] = (c * x - s * y) * zoom + translation[0]
        screen[..., 1] = (s * x + c * y) * zoom + translation[1]
        margin = stock.MAX_SHAPE_DIM
        inside = ((-margin <= screen[..., 0]) & (screen[..., 0] <= stock.WINDOW_W + margin)
                  & (-margin <= screen[..., 1]) & (screen[..., 1] <= stock.WINDOW_H + margin))
        return screen, inside.any(axis=1)

    def _render_road(self, zoom, translation, angle):
        if not self._cache_road():
            return super()._render_road(zoom, translation, angle)
        bounds = stock.PLAYFIELD
        field = [(bounds, bounds), (bounds, -bounds), (-bounds, -bounds), (-bounds, bounds)]
        self._draw_colored_polygon(self.surf, field, self.bg_color, zoom, translation, angle, clip=False)

        cos_sin = tuple(stock.pygame.math.Vector2(1.0, 0.0).rotate_rad(angle))
        grass, visible = self._transform(self._grass_vertices, zoom, translation, cos_sin)
        for index in np.flatnonzero(visible):
            self._fill(grass[index], self.grass_color)
        road, visible = self._transform(self._road_vertices, zoom, translation, cos_sin)
        for index in np.flatnonzero(visible):
            self._fill(road[index], [int(c) for c in self._road_colors[index]])

    def _fill(self, screen_poly: np.ndarray, color) -> None:
        poly = [tuple(vertex) for vertex in screen_poly.tolist()]
        stock.gfxdraw.aapolygon(self.surf, poly, color)
        stock.gfxdraw.filled_polygon(self.surf, poly, color)

    def _render(self, mode: str):
        # Stock `_render` with one change: the score font is made once and each score string rendered once.
        assert mode in self.metadata["render_modes"]
        pygame = stock.pygame
        pygame.font.init()
        if self.screen is None and mode == "human":
            pygame.display.init()
            self.screen = pygame.display.set_mode((stock.WINDOW_W, stock.WINDOW_H))
        if self.clock is None:
            self.clock = pygame.time.Clock()
        if "t" not in self.__dict__:
            return  # reset() not called yet
        if mode == "state_pixels" and not self.draw_state:
            return None  # a frame no one will see: drawing is ~1.35 ms of a 1.4 ms step, physics 0.05 ms

        self.surf = pygame.Surface((stock.WINDOW_W, stock.WINDOW_H))
        assert self.car is not None
        angle = -self.car.hull.angle
        zoom = 0.1 * stock.SCALE * max(1 - self.t, 0) + stock.ZOOM * stock.SCALE * min(self.t, 1)
        scroll_x = -(self.car.hull.position[0]) * zoom
        scroll_y = -(self.car.hull.position[1]) * zoom
        trans = pygame.math.Vector2((scroll_x, scroll_y)).rotate_rad(angle)
        trans = (stock.WINDOW_W / 2 + trans[0], stock.WINDOW_H / 4 + trans[1])

        self._render_road(zoom, trans, angle)
        self.car.draw(self.surf, zoom, trans, angle, mode not in ["state_pixels_list", "state_pixels"])
        self.surf = pygame.transform.flip(self.surf, False, True)
        self._render_indicators(stock.WINDOW_W, stock.WINDOW_H)

        score = f"{self.reward:04.0f}"
        if score not in self._score_texts:
            if self._score_font is None:
                self._score_font = pygame.font.Font(pygame.font.get_default_font(), 42)
            self._score_texts[score] = self._score_font.render(score, True, (255, 255, 255), (0, 0, 0))
        text = self._score_texts[score]
        text_rect = text.get_rect()
        text_rect.center = (60, stock.WINDOW_H - stock.WINDOW_H * 2.5 / 40.0)
        self.surf.blit(text, text_rect)

        if mode == "human":
            pygame.event.pump()
            self.clock.tick(self.metadata["render_fps"])
            assert self.screen is not None
            self.screen.fill(0)
            self.screen.blit(self.surf, (0, 0))
            pygame.display.flip()
        elif mode == "rgb_array":
            return self._create_image_array(self.surf, (stock.VIDEO_W, stock.VIDEO_H))
        elif mode == "state_pixels":
            return self._create_image_array(self.surf, (stock.STATE_W, stock.STATE_H))
        else:
            return self.isopen


gym.register(FAST_ENV_ID, entry_point=FastCarRacing, max_episode_steps=1000, reward_threshold=900)


def make_fast_env(**kwargs) -> gym.Env:
    """The fast env, or the stock one with a one-line warning where equivalence is unverified."""
    if equivalence_verified():
        # the passive checker would flag the undrawn frames of ActionRepeat (None), which no one reads
        return gym.make(FAST_ENV_ID, disable_env_checker=True, **kwargs)
    warnings.warn(f"fast CarRacing was verified pixel-exact only on {VERIFIED_VERSIONS}, not on "
                  f"{_installed_versions()}: using stock CarRacing-v3", stacklevel=2)
    return gym.make("CarRacing-v3", **kwargs)
