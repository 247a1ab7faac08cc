"""The method registry: one :class:`MethodSpec` per method name, read by explain, the CLI, evaluate and the app.

Everything the code needs to know about a method besides computing it lives here, so that no page,
table or export keeps its own list: its display title, whether its maps are signed (drawn on a
diverging scale centred at 0), whether it is slow (many passes per image: computed on request and
cached), whether it differentiates through the model, whether it is pixel-level (an input-space
attribution, not a map upsampled from the last feature map), and which library computes it.

``cascam:<base>`` names are not listed: :func:`method_spec` builds their spec from the base's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

CASCAM_PREFIX = "cascam:"
SANITY_PREFIX = "sanity:"


@dataclass(frozen=True)
class MethodSpec:
    """What a method is.

    name: the contract name passed to ``explain`` (``"gradcam"``, ``"cascam:gradcam"``).
    title: display name (``"Grad-CAM"``).
    kind: ``"native"`` (read off the model's own forward pass), ``"post-hoc"``, ``"cascam"`` or
        ``"sanity"`` (model-free baseline).
    signed: maps keep a sign (evidence for and against the class): diverging scale centred at 0.
    slow: seconds to minutes per image on a CPU (many forward passes or an optimisation).
    needs_gradients: differentiates through the model (autograd must be available).
    pixel_level: an input-resolution attribution; else a map upsampled from a coarse grid.
    needs_softcam: only a SoftCAM net (``forward_with_maps``) has these maps.
    implementation: who computes it (library and class, or the formula for native maps).
    """

    name: str
    title: str
    kind: str
    signed: bool = False
    slow: bool = False
    needs_gradients: bool = False
    pixel_level: bool = False
    needs_softcam: bool = False
    implementation: str = ""

    @property
    def model_free(self) -> bool:
        return self.kind == "sanity"


_SPECS = (
    MethodSpec("softcam", "SoftCAM", "native", signed=True, needs_softcam=True,
               implementation="SoftCAMNet.forward_with_maps: the target class's evidence map (logit = its mean)"),
    MethodSpec("softcam_contrast", "SoftCAM contrast", "native", signed=True, needs_softcam=True,
               implementation="A_c - mean of the other classes' evidence maps (mean = logit difference)"),
    MethodSpec("cam", "CAM", "native", signed=True,
               implementation="Zhou et al. 2016: W_c . last feature map (no bias)"),
    MethodSpec("gradcam", "Grad-CAM", "post-hoc", needs_gradients=True, implementation="torchcam GradCAM"),
    MethodSpec("gradcampp", "Grad-CAM++", "post-hoc", needs_gradients=True, implementation="torchcam GradCAMpp"),
    MethodSpec("xgradcam", "XGrad-CAM", "post-hoc", needs_gradients=True, implementation="torchcam XGradCAM"),
    MethodSpec("layercam", "LayerCAM", "post-hoc", needs_gradients=True, implementation="torchcam LayerCAM"),
    MethodSpec("scorecam", "Score-CAM", "post-hoc", slow=True, implementation="torchcam ScoreCAM"),
    MethodSpec("hirescam", "HiResCAM", "post-hoc", needs_gradients=True, implementation="pytorch-grad-cam HiResCAM"),
    MethodSpec("eigencam", "Eigen-CAM", "post-hoc", implementation="pytorch-grad-cam EigenCAM"),
    MethodSpec("ablationcam", "Ablation-CAM", "post-hoc", slow=True, implementation="pytorch-grad-cam AblationCAM"),
    MethodSpec("fullgrad", "FullGrad", "post-hoc", slow=True, needs_gradients=True, pixel_level=True,
               implementation="pytorch-grad-cam FullGrad"),
    MethodSpec("integrated_gradients", "Integrated Gradients", "post-hoc", signed=True, slow=True,
               needs_gradients=True, pixel_level=True,
               implementation="captum IntegratedGradients, summed over colour channels"),
    MethodSpec("guided_backprop", "Guided Backprop", "post-hoc", signed=True, needs_gradients=True, pixel_level=True,
               implementation="captum GuidedBackprop, summed over colour channels"),
    MethodSpec("sanity:edge", "Edge (sanity)", "sanity", pixel_level=True,
               implementation="model-free: sum_c |x_c - Gaussian(x_c, sigma=3 px)|"),
    MethodSpec("sanity:random", "Random (sanity)", "sanity", signed=True,
               implementation="model-free: Gaussian noise on a 32 px grid, bilinearly upsampled"),
    MethodSpec("sanity:centre", "Centre prior (sanity)", "sanity",
               implementation="model-free: isotropic Gaussian at the image centre"),
)
SPECS: dict[str, MethodSpec] = {spec.name: spec for spec in _SPECS}

# methods that explain a model; each can be the base of "cascam:<base>"
BASE_METHODS = tuple(spec.name for spec in _SPECS if spec.kind in ("native", "post-hoc"))
# the model-free sanity maps, the bar a map must beat
SANITY_METHODS = tuple(spec.name for spec in _SPECS if spec.kind == "sanity")
# every method name explain() takes besides "cascam:<base>"
METHODS = BASE_METHODS + SANITY_METHODS
# views of the registry for code that asks one question of a listed name
SIGNED_METHODS = frozenset(spec.name for spec in _SPECS if spec.signed)
GRADIENT_METHODS = frozenset(spec.name for spec in _SPECS if spec.needs_gradients)


def method_problem(name: str) -> str | None:
    """Why ``name`` is not a method explain() takes (one line), or None when it is one."""
    if not isinstance(name, str):
        return f"a method name must be a string, got {name!r}"
    if name.startswith(CASCAM_PREFIX):
        base = name[len(CASCAM_PREFIX):]
        if base in SANITY_METHODS:
            return (f"{name!r}: CasCAM masks the input by a model's map and explains the model again; "
                    f"a model-free sanity map cannot be cascaded (use {base!r} itself)")
        if base in BASE_METHODS:
            return None
        return f"unknown CasCAM base {base!r} in {name!r}; choose cascam:<one of {', '.join(BASE_METHODS)}>"
    if name in SPECS:
        return None
    return f"unknown method {name!r}; choose one of {', '.join(METHODS)} or cascam:<method>"


def is_method(name: str) -> bool:
    """True for a name in :data:`METHODS` or ``cascam:<base>`` with ``base`` in :data:`BASE_METHODS`."""
    return method_problem(name) is None


def method_spec(name: str) -> MethodSpec:
    """The spec of a method name, ``cascam:<base>`` included. Raises ValueError for an unknown name.

    A CasCAM map is a weighted sum of its stages' min-max normalised maps: non-negative, slow (one
    pass of the base method per stage), and as pixel-level and gradient-hungry as its base.
    """
    problem = method_problem(name)
    if problem is not None:
        raise ValueError(problem)
    if name.startswith(CASCAM_PREFIX):
        base = SPECS[name[len(CASCAM_PREFIX):]]
        return replace(base, name=name, title=f"CasCAM ({base.title})", kind="cascam", signed=False, slow=True,
                       implementation=f"softcam_core.explain.cascam over {base.name}")
    return SPECS[name]


def method_title(name: str) -> str:
    """Display name of a method, e.g. ``"gradcampp"`` -> ``"Grad-CAM++"``; an unknown name is returned as is."""
    try:
        return method_spec(name).title
    except ValueError:
        return str(name)


def cascam_methods() -> tuple[str, ...]:
    """``cascam:<base>`` for every base method, in registry order (what a method picker offers)."""
    return tuple(CASCAM_PREFIX + base for base in BASE_METHODS)


def file_safe_name(method: str) -> str:
    """File stem for a method's outputs: ``cascam:gradcam`` -> ``cascam-gradcam``."""
    return method.replace(":", "-")
