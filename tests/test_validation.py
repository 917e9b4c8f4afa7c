"""Request validation's fast path: the checks compiled from the schemas say valid exactly
when jsonschema does, and every request schema has one."""
import itertools
import math

import pytest

import ozwell

REGISTRY = ozwell.SchemaRegistry.load()


def strings_in(node, found):
    """Every string an enum or const of the schemas names: values that switch if/then."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "const" and isinstance(value, str):
                found.add(value)
            elif key == "enum":
                found.update(item for item in value if isinstance(item, str))
            else:
                strings_in(value, found)
    elif isinstance(node, list):
        for item in node:
            strings_in(item, found)
    return found


NAMED = sorted(strings_in(REGISTRY.schemas, set()))
ODD = [None, True, False, 0, 1, -1, 2.0, 2.5, 1e300, math.nan, math.inf, "", "x", [], [1], {},
       {"type": "text"}, {"x": None}]


def variants(instance, depth=0):
    """The instance, and instances that differ from it in one place: a member dropped, added,
    or replaced by a value of another type (or a named enum value), at any depth."""
    yield instance
    if depth > 4:
        return
    if isinstance(instance, dict):
        yield {**instance, "unknown_parameter": 1}
        for key, value in instance.items():
            yield {k: v for k, v in instance.items() if k != key}
            for other in itertools.chain(variants(value, depth + 1), ODD,
                                         NAMED if isinstance(value, str) else ()):
                yield {**instance, key: other}
    elif isinstance(instance, list):
        yield []
        yield instance + instance[:1]
        for position, item in enumerate(instance):
            for other in itertools.chain(variants(item, depth + 1), ODD[:8]):
                yield instance[:position] + [other] + instance[position + 1:]


def members_named_by(schema):
    """An instance for each optional member the schema names, with a value of each kind."""
    for name in schema.get("properties", {}):
        for value in ODD + NAMED[:10]:
            yield name, value


@pytest.mark.parametrize("name", sorted(REGISTRY.schemas))
def test_the_compiled_check_agrees_with_jsonschema(name):
    schema = REGISTRY.schemas[name]
    check = REGISTRY.checks[name]
    assert check is not None, f"{name} uses a keyword the fast path does not compile"
    instances = []
    for example in schema.get("examples", []):
        instances += list(variants(example))
        if isinstance(example, dict):
            instances += [{**example, key: value} for key, value in members_named_by(schema)]
    instances += ODD
    assert len(instances) > 20
    disagreements = [instance for instance in instances
                     if check(instance) != (next(REGISTRY.errors(name, instance), None) is None)]
    assert disagreements == []


def test_every_request_body_is_checked_by_a_compiled_check():
    requests = {operation.request for route in ozwell.ROUTES
                for operation in route.handler.api.values() if operation.request}
    assert requests and all(REGISTRY.checks[name] is not None for name in requests)


def test_a_schema_with_a_keyword_it_does_not_compile_falls_back_to_jsonschema():
    registry = ozwell.SchemaRegistry({
        # Each refers to the other; only Pair uses a keyword the fast path does not compile.
        "Holder": {"type": "object", "properties": {"pair": {"$ref": "Pair.json"}}},
        "Pair": {"type": "array", "uniqueItems": True,
                 "items": {"anyOf": [{"type": "integer"}, {"$ref": "Holder.json"}]}},
        "Plain": {"type": "object", "properties": {"holder": {"$ref": "Holder.json"}}},
    })
    assert registry.checks == {"Holder": None, "Pair": None, "Plain": None}
    registry.validate("Pair", [1, 2, {"pair": [3]}])
    with pytest.raises(ozwell.APIError) as raised:
        registry.validate("Plain", {"holder": {"pair": [1, 1]}})
    assert "non-unique" in raised.value.message and raised.value.param == "holder.pair"


def test_references_between_files_and_to_a_schema_itself_are_followed():
    registry = ozwell.SchemaRegistry({
        "Tree": {"type": "object", "properties": {
            "leaf": {"$ref": "Leaf.json"},
            "children": {"type": "array", "items": {"$ref": "#"}}},
            "additionalProperties": False},
        "Leaf": {"$defs": {"Name": {"type": "string", "pattern": "^[a-z]+$"}},
                 "type": "object", "properties": {"name": {"$ref": "#/$defs/Name"}},
                 "required": ["name"]},
    })
    check = registry.checks["Tree"]
    assert check({"leaf": {"name": "oak"}, "children": [{"children": [{"leaf": {"name": "a"}}]}]})
    assert not check({"children": [{"children": [{"leaf": {"name": "A1"}}]}]})
    assert not check({"children": [{"children": [{"leaf": {}}]}]})
    assert not check({"children": [{"extra": 1}]})


EVERY_KEYWORD = {
    "type": "object",
    "properties": {
        "short": {"type": "string", "minLength": 2, "maxLength": 3, "pattern": "^a"},
        "few": {"type": "array", "minItems": 1, "maxItems": 2,
                "prefixItems": [{"const": 1}], "items": {"type": ["integer", "null"]}},
        "closed": {"type": "array", "prefixItems": [{"type": "string"}], "items": False},
        "small": {"type": "object", "minProperties": 1, "maxProperties": 2,
                  "propertyNames": {"pattern": "^[a-z]+$"}},
        "range": {"type": "number", "minimum": 0, "exclusiveMaximum": 10},
        "open": {"type": "number", "exclusiveMinimum": 0, "maximum": 10},
        "choice": {"enum": ["a", 1, None, [1], {"k": True}]},
        "exact": {"const": {"n": [1, False]}},
        "one": {"oneOf": [{"type": "integer"}, {"type": "number", "minimum": 5}]},
        "any": {"anyOf": [{"type": "string"}, {"type": "boolean"}]},
        "neither": {"not": {"type": "string"}},
        "both": {"allOf": [{"type": "string"}, {"minLength": 1}]},
        "shaped": {"if": {"properties": {"kind": {"const": "x"}}, "required": ["kind"]},
                   "then": {"required": ["x"]}, "else": {"required": ["y"]}},
    },
    "patternProperties": {"^n_": {"type": "integer"}},
    "additionalProperties": {"type": "boolean"},
    "required": ["short"],
}
VALUES = ["", "a", "ab", "abc", "abcd", "ba", [], [1], [1, None], [1, 2, 3], [2], [1, 2.5],
          ["s"], ["s", 1], {}, {"a": 1}, {"a": 1, "b": 2, "c": 3}, {"A": 1}, -1, 0, 0.5, 5, 10,
          10.0, 11, math.nan, True, False, None, 1, 1.0, [True], {"k": True}, {"k": 1},
          {"n": [1, False]}, {"n": [1, 0]}, {"n": [True, False]}, {"kind": "x", "x": 1},
          {"kind": "x"}, {"kind": "z", "y": 1}, {"kind": "z"}, 7, 7.5, 3.0]


def test_every_compiled_keyword_agrees_with_jsonschema():
    registry = ozwell.SchemaRegistry({"Every": EVERY_KEYWORD})
    check = registry.checks["Every"]
    instances = [{"short": "ab"}, {"short": "ab", "n_1": 1}, {"short": "ab", "n_1": "1"},
                 {"short": "ab", "other": True}, {"short": "ab", "other": 1}, {}, [], "ab"]
    instances += [{"short": "ab", name: value} for name in EVERY_KEYWORD["properties"]
                  for value in VALUES]
    instances += [{"short": value} for value in VALUES]
    disagreements = [instance for instance in instances
                     if check(instance) != (next(registry.errors("Every", instance), None) is None)]
    assert disagreements == []
    assert 0 < sum(map(check, instances)) < len(instances)
