"""Property-based: any malformed recipe or bad ``--set`` value ends in exit code 2 and a message
naming the key, never a traceback (``corex validate``, driven in-process).

Each key of the tiny recipe has a strategy of values that are wrong for it (wrong type, out of
range, not finite, not one of the choices). The ranged keys and their ranges are read from the
schema (every field whose metadata ``check`` is a :class:`corex.schema.Limits`), so a new ranged key
is fuzzed without touching this file; a schema class with ranged keys that this file cannot place
in a recipe fails ``test_the_strategies_cover_every_ranged_key_of_the_schema``. The other keys
(choices, booleans, strings, the device) are listed here.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import string

import attrs
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corex import schema
from corex.cli import main

# -- values that are wrong for a kind of key -------------------------------------------------------

words = st.text(alphabet=string.ascii_letters + "_- ", min_size=1, max_size=10)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


not_number_text = words.filter(lambda t: not _is_number(t))
containers = st.one_of(st.lists(st.integers(), max_size=2), st.dictionaries(words, st.integers(), max_size=2))
not_finite = st.sampled_from([math.nan, math.inf, -math.inf])
not_a_number = st.one_of(not_number_text, containers, st.booleans(), st.none())
not_an_integer = st.one_of(not_a_number, st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer()))
not_a_bool = st.one_of(st.integers(), words, containers)
not_a_string = st.one_of(st.integers(), st.floats(allow_nan=False), containers, st.booleans())


def floats_below(limit: float, *, inclusive: bool) -> st.SearchStrategy[float]:
    values = st.floats(max_value=limit, allow_nan=False, allow_infinity=False)
    return values.filter(lambda x: x <= limit if inclusive else x < limit)


def floats_above(limit: float, *, inclusive: bool) -> st.SearchStrategy[float]:
    values = st.floats(min_value=limit, allow_nan=False, allow_infinity=False)
    return values.filter(lambda x: x >= limit if inclusive else x > limit)


def bad_float(low: float | None = None, high: float | None = None, *, low_ok=True, high_ok=True):
    """Numbers outside [low, high] (an end is excluded when ``*_ok`` is False), non-finite ones, non-numbers."""
    options = [not_finite, not_a_number]
    if low is not None:
        options.append(floats_below(low, inclusive=not low_ok))
    if high is not None:
        options.append(floats_above(high, inclusive=not high_ok))
    return st.one_of(options)


def bad_int(low: int | None = None, high: int | None = None):
    options = [not_an_integer]
    if low is not None:
        options.append(st.integers(max_value=low - 1))
    if high is not None:
        options.append(st.integers(min_value=high + 1))
    return st.one_of(options)


def not_one_of(*choices: str):
    return st.one_of(words.filter(lambda w: w not in choices), not_a_string)


def bad_betas():
    in_range = st.floats(min_value=0, max_value=1, exclude_max=True)
    out_of_range = st.one_of(floats_below(0, inclusive=False), floats_above(1, inclusive=True), not_finite)
    pairs = st.one_of(st.tuples(out_of_range, in_range), st.tuples(in_range, out_of_range)).map(list)
    return st.one_of(pairs, st.lists(in_range, min_size=3, max_size=4), not_a_number.filter(lambda v: v is not None))


def bad_device():
    def valid(text: str) -> bool:
        return text in ("auto", "cpu", "mps", "cuda") or (text.startswith("cuda:") and text[5:].isdigit())

    return st.one_of(st.text(alphabet=string.ascii_lowercase + ":0123456789", min_size=1, max_size=8).filter(lambda t: not valid(t)), not_a_string)


# Where each schema class with ranged keys sits in the tiny recipe (stages train, test).
RANGED_CLASSES = {
    schema.Recipe: "", schema.Data: "data.", schema.Optimizer: "optimizer.", schema.Schedule: "schedule.",
    schema.Stage: "stages.train.", schema.Head: "stages.train.heads.segmentation.",
}


def bad_for_limits(limits: schema.Limits, kind: str) -> st.SearchStrategy:
    """Values a field of type ``kind`` (int, float, a tuple of floats) with these limits must refuse."""
    if kind == "tuple":
        good = st.floats(min_value=limits.low, max_value=limits.high, exclude_min=limits.low_open, exclude_max=limits.high_open)
        bad = bad_for_limits(limits, "float").filter(lambda v: isinstance(v, float))
        pairs = st.one_of(st.tuples(bad, good), st.tuples(good, bad)).map(list)
        return st.one_of(pairs, st.lists(good, min_size=3, max_size=4), not_a_number.filter(lambda v: v is not None))
    if kind == "int":
        low = None if limits.low is None else int(limits.low) + limits.low_open
        high = None if limits.high is None else int(limits.high) - limits.high_open
        options = [bad_int(low, high)]
        if limits.multiple_of:
            options.append(st.integers(low, high).filter(lambda n: n % limits.multiple_of))
        return st.one_of(options)
    return bad_float(limits.low, limits.high, low_ok=not limits.low_open, high_ok=not limits.high_open)


def ranged_keys() -> dict[str, st.SearchStrategy]:
    """Every ranged key of the schema at its place in the tiny recipe, with values out of its range."""
    found = {}
    for cls, prefix in RANGED_CLASSES.items():
        for field in attrs.fields(attrs.resolve_types(cls)):
            limits = field.metadata.get("check")
            if not isinstance(limits, schema.Limits):
                continue
            text = str(field.type)
            kind = "tuple" if "tuple" in text else "int" if "int" in text else "float"
            strategy = bad_for_limits(limits, kind)
            if "None" in text:  # null means "inherit" or "off": a good value
                strategy = strategy.filter(lambda v: v is not None)
            found[prefix + field.name] = strategy
    return found


# Every key a user may get wrong, and values that are wrong for it (tiny recipe: stages train, test):
# the ranged keys from the schema, then the others.
BAD_VALUES = {
    **ranged_keys(),
    "device": bad_device(),
    "deterministic": not_a_bool,
    "description": not_a_string,
    "data.studies": not_an_integer,  # the toy factory checks its range itself, when built (validate --build)
    "model.channels_last": not_a_bool,
    "model.encoder.width": not_an_integer.filter(lambda v: v is not None),
    "optimizer.name": not_one_of("sgd", "adam", "adamw"),
    "schedule.name": not_one_of("cosine", "constant"),
    "stages.train.kind": not_one_of("train", "pretrain", "evaluate"),
    "data.reduce_val": not_a_bool,
    "stages.train.amp": not_one_of("auto", "off", "bf16", "fp16"),
    "stages.train.freeze": not_a_bool,
    "stages.test.split": not_one_of("train", "val", "test"),
}


def as_yaml(value) -> str:
    """A value as YAML text that reads back to the same value (JSON is YAML, except non-finite floats)."""
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(as_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {as_yaml(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def set_path(recipe: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    node = recipe
    for part in parents:
        if isinstance(node.get(part), str):  # a component given by name
            node[part] = {"name": node[part]}
        node = node.setdefault(part, {})
    node[last] = value


def validate(*args) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(["validate", *map(str, args)])
    return code, err.getvalue()


# No example database: the suite writes nothing outside its temporary folders.
FUZZ = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture
def recipe_file(tiny_recipe, tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe, sort_keys=False))
    code, err = validate(path)
    assert code == 0, err  # the base recipe is good: every problem below comes from the bad value
    return path


def test_the_strategies_cover_every_ranged_key_of_the_schema():
    placed = set(RANGED_CLASSES)
    for name, cls in vars(schema).items():
        if attrs.has(cls) and cls.__module__ == schema.__name__:
            ranged = [f.name for f in attrs.fields(cls) if isinstance(f.metadata.get("check"), schema.Limits)]
            assert not ranged or cls in placed, f"schema.{name} has ranged keys {ranged}: add where it sits in the recipe to RANGED_CLASSES"
    keys = set(ranged_keys())
    # The documented ranges (docs/recipes.md) are in the schema, and so are fuzzed.
    assert {"seed", "data.image_size", "data.batch_size", "data.num_workers", "data.label_fraction", "data.seed", "optimizer.lr",
            "optimizer.weight_decay", "optimizer.momentum", "optimizer.betas", "schedule.warmup_epochs", "schedule.warmup_steps",
            "schedule.min_lr_ratio", "stages.train.epochs", "stages.train.steps", "stages.train.batch_size", "stages.train.grad_clip",
            "stages.train.max_steps_per_epoch", "stages.train.checkpoint_every", "stages.train.ema",
            "stages.train.heads.segmentation.weight"} <= keys


@pytest.mark.parametrize("key", sorted(ranged_keys()))
def test_each_ranged_key_refuses_a_value_just_outside_its_range_and_takes_its_edges(recipe_file, key):
    """The derived range is the one the schema enforces: just past an end is refused, the ends are taken."""
    cls = next(c for c, prefix in RANGED_CLASSES.items() if key.startswith(prefix) and "." not in key[len(prefix):])
    field = attrs.fields_dict(cls)[key.rsplit(".", 1)[-1]]
    limits, integer = field.metadata["check"], "int" in str(field.type)
    step = 1 if integer else 1e-9
    for end, is_open, direction in ((limits.low, limits.low_open, -1), (limits.high, limits.high_open, 1)):
        if end is None:
            continue
        inside = end - direction * step if is_open else end
        outside = end if is_open else end + direction * step
        if integer:
            inside, outside = int(inside), int(outside)
            if limits.multiple_of:
                inside -= inside % limits.multiple_of
        wrap = (lambda v: f"[{v}, {v}]") if "tuple" in str(field.type) else str
        code, err = validate(recipe_file, "--no-build", "--set", f"{key}={wrap(outside)}")
        assert code == 2 and key in err, (key, outside, err)
        code, err = validate(recipe_file, "--no-build", "--set", f"{key}={wrap(inside)}")
        assert code == 0, (key, inside, err)


@settings(max_examples=400, **FUZZ)
@given(data=st.data())
def test_a_bad_set_value_is_a_message_naming_its_key(recipe_file, data):
    key = data.draw(st.sampled_from(sorted(BAD_VALUES)), label="key")
    value = data.draw(BAD_VALUES[key], label="value")
    code, err = validate(recipe_file, "--set", f"{key}={as_yaml(value)}")
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("corex: ")
    assert key in err, err


@settings(max_examples=250, **FUZZ)
@given(data=st.data())
def test_a_recipe_with_several_bad_values_names_every_key(tiny_recipe, tmp_path, data):
    keys = data.draw(st.lists(st.sampled_from(sorted(BAD_VALUES)), min_size=1, max_size=5, unique=True), label="keys")
    recipe = json.loads(json.dumps(tiny_recipe))
    for key in keys:
        set_path(recipe, key, data.draw(BAD_VALUES[key], label=key))
    path = tmp_path / "bad.yaml"
    path.write_text(as_yaml(recipe))
    code, err = validate(path)
    assert code == 2, err
    assert "Traceback" not in err
    for key in keys:
        assert key in err, (key, err)


identifiers = st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=12)


@settings(max_examples=100, **FUZZ)
@given(data=st.data())
def test_unknown_keys_and_malformed_overrides_are_messages(recipe_file, data):
    where = data.draw(st.sampled_from(["", "data.", "optimizer.", "stages.train.", "stages.missing.", "model.encoder."]))
    name = data.draw(identifiers.filter(lambda n: n not in KNOWN_KEYS))
    form = data.draw(st.sampled_from(["key=value", "no equals sign", "=value only"]))
    if form == "key=value":
        override, named = f"{where}{name}={as_yaml(data.draw(st.integers()))}", f"{where}{name}"
    elif form == "no equals sign":
        override = named = f"{where}{name}"
    else:
        override = named = f"={name}"
    code, err = validate(recipe_file, "--set", override)
    assert code == 2, err
    assert "Traceback" not in err
    assert named in err, err


# Keys that exist in the tiny recipe at some level: an "unknown" key must not be one of them.
KNOWN_KEYS = {
    "name", "description", "seed", "device", "deterministic", "output", "data", "model", "optimizer", "schedule",
    "stages", "image_size", "batch_size", "num_workers", "label_fraction", "cache_dir", "studies", "noise",
    "encoder", "channels_last", "lr", "weight_decay", "momentum", "betas", "warmup_epochs", "min_lr_ratio",
    "kind", "epochs", "heads", "objective", "augment", "evaluators", "split", "encoder_from", "freeze", "select",
    "grad_clip", "amp", "max_steps_per_epoch", "width", "in_channels", "weights", "options",
}


@settings(max_examples=100, **FUZZ)
@given(data=st.data())
def test_run_refuses_a_bad_set_value_before_it_writes_anything(recipe_file, tmp_path, data):
    key = data.draw(st.sampled_from(sorted(BAD_VALUES)), label="key")
    value = data.draw(BAD_VALUES[key], label="value")
    out = tmp_path / "never"
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(["run", str(recipe_file), "--out", str(out), "--set", f"{key}={as_yaml(value)}"])
    assert code == 2, err.getvalue()
    assert "Traceback" not in err.getvalue() and key in err.getvalue()
    assert not out.exists()
