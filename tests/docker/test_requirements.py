"""The images' requirement files agree with the root requirements.txt (the one tested set of pins), and the
converter image's set covers everything `converters/` imports (offline: the installed metadata of this venv)."""

from __future__ import annotations

import importlib.metadata

from dockerfiles import AIRFLOW, CONVERTER, CONVERTER_TPU, REPO, ROOT_REQUIREMENTS, closure, pins, third_party_imports
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# Pins that exist only in an image, with the reason; everything else must be pinned the same in requirements.txt.
ONLY_IN_IMAGES = {
    AIRFLOW.name: {
        "apache-airflow-providers-google"
    },  # GCS for the workers and the UI; not needed for the embedded venv
    CONVERTER.name: set(),
    CONVERTER_TPU.name: {"libtpu"},  # jax[tpu]'s runtime; no TPU here
}


def test_every_image_pin_agrees_with_requirements_txt():
    root = pins(ROOT_REQUIREMENTS)
    for path in (CONVERTER, CONVERTER_TPU, AIRFLOW):
        for name, (version, extras) in pins(path).items():
            if name in ONLY_IN_IMAGES[path.name]:
                continue
            assert name in root, f"{path.name}: {name} is not pinned in requirements.txt"
            assert version == root[name][0], f"{path.name}: {name}=={version}, requirements.txt has {root[name][0]}"
            allowed_extras = root[name][1] | ({"tpu"} if path == CONVERTER_TPU and name == "jax" else set())
            assert extras <= allowed_extras, f"{path.name}: {name}[{','.join(extras)}]"


def test_tpu_set_is_the_cpu_set_plus_the_tpu_runtime():
    cpu, tpu = pins(CONVERTER), pins(CONVERTER_TPU)
    assert {k: v[0] for k, v in cpu.items()}.items() <= {k: v[0] for k, v in tpu.items()}.items()
    assert set(tpu) - set(cpu) == {"libtpu"} and "tpu" in tpu["jax"][1]
    # libtpu is the one jax's `tpu` extra asks for.
    jax_requires = [Requirement(r) for r in importlib.metadata.requires("jax") or []]
    (libtpu,) = [
        r
        for r in jax_requires
        if canonicalize_name(r.name) == "libtpu" and r.marker and r.marker.evaluate({"extra": "tpu"})
    ]
    assert libtpu.specifier.contains(tpu["libtpu"][0]), (libtpu, tpu["libtpu"])
    assert tpu["jax"][0] == tpu["jaxlib"][0] == pins(ROOT_REQUIREMENTS)["jax"][0]


def test_images_share_their_common_pins():
    """The airflow image with WITH_CONVERTER=true installs both files together."""
    conv, air = pins(CONVERTER), pins(AIRFLOW)
    for name in set(conv) & set(air):
        assert conv[name][0] == air[name][0], name


def test_converter_image_pins_what_the_package_declares_and_converters_imports():
    """pyproject's dependencies that `converters/` imports, and the whole `verify` extra, are pinned for the
    converter image (the others, like PyYAML for the watch list, serve operators/ and the Airflow image)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    imported = set().union(*third_party_imports(REPO / "converters").values())
    image = pins(CONVERTER)
    for raw in project["optional-dependencies"]["verify"]:
        assert canonicalize_name(Requirement(raw).name) in image, raw
    for raw in project["dependencies"]:
        name = canonicalize_name(Requirement(raw).name)
        if name in imported:
            assert name in image, f"{name}: imported by converters/ but not pinned in {CONVERTER.name}"


def test_every_import_of_converters_is_installed_in_the_converter_image():
    image = closure(pins(CONVERTER))
    missing = {mod: dists for mod, dists in third_party_imports(REPO / "converters").items() if not dists & image}
    assert not missing, f"imported by converters/ but not installed by {CONVERTER.name}: {missing}"
