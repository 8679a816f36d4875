"""Stand-in for ``comfy_api/latest/_io.py`` (ComfyUI v0.28): the V3 node schema, for the parts the pack uses.

What is reproduced, because the pack and its tests depend on it:

* inputs ``Int``, ``Boolean``, ``Combo``, ``Model``, ``Custom(io_type)`` and their outputs; ``as_dict``
  drops ``None`` fields, so the V1 form ``(io_type, options)`` that ``INPUT_TYPES()`` and the server's
  ``/object_info`` carry is the same as ComfyUI's (combos become ``("COMBO", {"options": [...],
  "multiselect": False, ...})``, optional inputs go to ``"optional"`` without an ``optional`` key);
* ``Schema``: ``finalize`` names unnamed outputs ``_<i>_<TYPE>_``, ``validate`` rejects duplicate ids,
  ``get_v1_info`` builds ComfyUI's ``NodeInfoV1`` (what ``GET_NODE_INFO_V1`` returns as a dict);
* ``ComfyNode``: ``GET_SCHEMA`` fills the V1 class properties (``CATEGORY``, ``DESCRIPTION``,
  ``DEPRECATED``, ``RETURN_TYPES``, ``RETURN_NAMES``, ``OUTPUT_TOOLTIPS``, ...) once per class, as
  ComfyUI caches them (``cls._X is None`` checks, so a subclass sees values a parent cached first);
  execution goes through ``PREPARE_CLASS_CLONE`` (a subclass whose ``hidden`` holds ``unique_id``) and
  ``EXECUTE_NORMALIZED`` (tuples and dicts become ``NodeOutput``).

tests/test_v3_schema.py compares what this stand-in reports for every node of the pack with
``/object_info`` recorded from a real ComfyUI 0.28 (tests/fixtures/object_info_v3.json), and the real
tier compares the real ComfyUI with the same file.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any


def prune_dict(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


class classproperty:
    def __init__(self, f):
        self.f = f

    def __get__(self, obj, owner):
        return self.f(owner)


# ------------------------------------------------------------------------------------- inputs/outputs
class Input:
    Parent = None

    def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, extra_dict=None,
                 raw_link=None, advanced=None):
        self.id = id
        self.display_name = display_name
        self.optional = optional
        self.tooltip = tooltip
        self.lazy = lazy
        self.extra_dict = extra_dict if extra_dict is not None else {}
        self.rawLink = raw_link
        self.advanced = advanced

    @property
    def io_type(self):
        return self.Parent.io_type

    def as_dict(self):
        return prune_dict({"display_name": self.display_name, "optional": self.optional, "tooltip": self.tooltip,
                           "lazy": self.lazy, "rawLink": self.rawLink, "advanced": self.advanced}) | prune_dict(self.extra_dict)

    def get_io_type(self):
        return self.io_type

    def get_all(self):
        return [self]

    def validate(self):
        pass


class WidgetInput(Input):
    def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None, socketless=None,
                 widget_type=None, force_input=None, extra_dict=None, raw_link=None, advanced=None):
        super().__init__(id, display_name, optional, tooltip, lazy, extra_dict, raw_link, advanced)
        self.default = default
        self.socketless = socketless
        self.widget_type = widget_type
        self.force_input = force_input

    def as_dict(self):
        return super().as_dict() | prune_dict({"default": self.default, "socketless": self.socketless,
                                               "widgetType": self.widget_type, "forceInput": self.force_input})

    def get_io_type(self):
        return self.widget_type if self.widget_type is not None else super().get_io_type()


class Output:
    Parent = None

    def __init__(self, id=None, display_name=None, tooltip=None, is_output_list=False):
        self.id = id
        self.display_name = display_name if display_name else id
        self.tooltip = tooltip
        self.is_output_list = is_output_list

    @property
    def io_type(self):
        return self.Parent.io_type

    def validate(self):
        pass


def _comfytype(io_type: str, input_cls=Input, output_cls=Output):
    """A type with its own Input/Output subclasses bound to it (ComfyUI's ``@comfytype``)."""
    def decorator(cls):
        cls.io_type = io_type
        cls.Input = type("Input", (cls.__dict__.get("Input", input_cls),), {"Parent": cls})
        cls.Output = type("Output", (cls.__dict__.get("Output", output_cls),), {"Parent": cls})
        return cls
    return decorator


@_comfytype("BOOLEAN")
class Boolean:
    class Input(WidgetInput):
        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None, label_on=None,
                     label_off=None, socketless=None, force_input=None, extra_dict=None, raw_link=None, advanced=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input,
                             extra_dict, raw_link, advanced)
            self.label_on = label_on
            self.label_off = label_off

        def as_dict(self):
            return super().as_dict() | prune_dict({"label_on": self.label_on, "label_off": self.label_off})


@_comfytype("INT")
class Int:
    class Input(WidgetInput):
        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None, min=None,
                     max=None, step=None, control_after_generate=None, display_mode=None, socketless=None,
                     force_input=None, extra_dict=None, raw_link=None, advanced=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input,
                             extra_dict, raw_link, advanced)
            self.min, self.max, self.step = min, max, step
            self.control_after_generate = control_after_generate
            self.display_mode = display_mode

        def as_dict(self):
            return super().as_dict() | prune_dict({
                "min": self.min, "max": self.max, "step": self.step,
                "control_after_generate": self.control_after_generate,
                "display": self.display_mode.value if self.display_mode else None})


@_comfytype("STRING")
class String:
    class Input(WidgetInput):
        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, multiline=False,
                     placeholder=None, default=None, dynamic_prompts=None, socketless=None, force_input=None,
                     extra_dict=None, raw_link=None, advanced=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input,
                             extra_dict, raw_link, advanced)
            self.multiline, self.placeholder, self.dynamic_prompts = multiline, placeholder, dynamic_prompts

        def as_dict(self):
            return super().as_dict() | prune_dict({"multiline": self.multiline, "placeholder": self.placeholder,
                                                   "dynamicPrompts": self.dynamic_prompts})


@_comfytype("COMBO")
class Combo:
    class Input(WidgetInput):
        def __init__(self, id, options=None, display_name=None, optional=False, tooltip=None, lazy=None, default=None,
                     control_after_generate=None, upload=None, image_folder=None, remote=None, socketless=None,
                     extra_dict=None, raw_link=None, advanced=None):
            if isinstance(options, type) and issubclass(options, Enum):
                options = [v.value for v in options]
            if isinstance(default, Enum):
                default = default.value
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, None, extra_dict,
                             raw_link, advanced)
            self.multiselect = False
            self.options = options
            self.control_after_generate = control_after_generate
            if upload is not None or image_folder is not None or remote is not None:
                raise NotImplementedError("the stand-in has no upload / image_folder / remote combos")

        def as_dict(self):
            return super().as_dict() | prune_dict({"multiselect": self.multiselect, "options": self.options,
                                                   "control_after_generate": self.control_after_generate})


@_comfytype("MODEL")
class Model:
    pass


def Custom(io_type: str):
    """A type for a custom ``io_type`` string (ComfyUI's ``io.Custom``)."""
    @_comfytype(io_type)
    class CustomComfyType:
        pass
    return CustomComfyType


# ------------------------------------------------------------------------------------- hidden inputs
class Hidden(str, Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"
    dynprompt = "DYNPROMPT"
    auth_token_comfy_org = "AUTH_TOKEN_COMFY_ORG"
    api_key_comfy_org = "API_KEY_COMFY_ORG"
    comfy_usage_source = "COMFY_USAGE_SOURCE"


class HiddenHolder:
    def __init__(self, unique_id=None, prompt=None, extra_pnginfo=None, dynprompt=None, auth_token_comfy_org=None,
                 api_key_comfy_org=None, comfy_usage_source=None, **kwargs):
        self.unique_id = unique_id
        self.prompt = prompt
        self.extra_pnginfo = extra_pnginfo
        self.dynprompt = dynprompt
        self.auth_token_comfy_org = auth_token_comfy_org
        self.api_key_comfy_org = api_key_comfy_org
        self.comfy_usage_source = comfy_usage_source

    def __getattr__(self, key):
        return None  # ComfyUI: a hidden value that was not requested reads as None

    @classmethod
    def from_dict(cls, d):
        d = d or {}
        return cls(**{h.name: d.get(h, None) for h in Hidden})


# ------------------------------------------------------------------------------------- schema
@dataclass
class NodeInfoV1:
    input: dict = None
    input_order: dict = None
    is_input_list: bool = None
    output: list = None
    output_is_list: list = None
    output_name: list = None
    output_tooltips: list = None
    output_matchtypes: list = None
    name: str = None
    display_name: str = None
    description: str = None
    python_module: Any = None
    category: str = None
    output_node: bool = None
    deprecated: bool = None
    experimental: bool = None
    dev_only: bool = None
    api_node: bool = None
    price_badge: dict = None
    search_aliases: list = None
    essentials_category: str = None
    has_intermediate_output: bool = None


def create_input_dict_v1(inputs) -> dict:
    d = {"required": {}}
    for i in inputs:
        as_dict = i.as_dict()
        as_dict.pop("optional", None)  # V1 tells optional inputs by their section, not by a key
        d.setdefault("optional" if i.optional else "required", {})[i.id] = (i.get_io_type(), as_dict)
    return d


@dataclass
class Schema:
    node_id: str
    display_name: str = None
    category: str = "sd"
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    hidden: list = field(default_factory=list)
    description: str = ""
    search_aliases: list = field(default_factory=list)
    is_input_list: bool = False
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    is_dev_only: bool = False
    is_api_node: bool = False
    price_badge: Any = None
    not_idempotent: bool = False
    enable_expand: bool = False
    accept_all_inputs: bool = False
    essentials_category: str = None
    has_intermediate_output: bool = False

    def validate(self):
        ids = [i.id for i in self.inputs]
        out_ids = [o.id for o in self.outputs]
        issues = []
        if len(set(ids)) != len(ids):
            issues.append(f"Input ids must be unique, but {sorted({i for i in ids if ids.count(i) > 1})} are not.")
        if len(set(out_ids)) != len(out_ids):
            issues.append(f"Output ids must be unique, but {sorted({i for i in out_ids if out_ids.count(i) > 1})} are not.")
        if issues:
            raise ValueError("\n".join(issues))

    def finalize(self):
        self.inputs = self.inputs or []
        self.outputs = self.outputs or []
        self.hidden = self.hidden or []
        if self.is_output_node:
            for h in (Hidden.prompt, Hidden.extra_pnginfo):
                if h not in self.hidden:
                    self.hidden.append(h)
        for i, output in enumerate(self.outputs):
            if output.id is None:
                output.id = f"_{i}_{output.io_type}_"

    def get_v1_info(self, cls) -> NodeInfoV1:
        input = create_input_dict_v1(self.inputs)
        for h in self.hidden:
            input.setdefault("hidden", {})[h.name] = (h.value,)
        return NodeInfoV1(
            input=input,
            input_order={key: list(value.keys()) for key, value in input.items()},
            is_input_list=self.is_input_list,
            output=[o.io_type for o in self.outputs],
            output_is_list=[o.is_output_list for o in self.outputs],
            output_name=[o.display_name if o.display_name else o.io_type for o in self.outputs],
            output_tooltips=[o.tooltip if o.tooltip else None for o in self.outputs],
            output_matchtypes=None,
            name=self.node_id,
            display_name=self.display_name,
            description=self.description,
            python_module=getattr(cls, "RELATIVE_PYTHON_MODULE", "nodes"),
            category=self.category,
            output_node=self.is_output_node,
            deprecated=self.is_deprecated,
            experimental=self.is_experimental,
            dev_only=self.is_dev_only,
            api_node=self.is_api_node,
            price_badge=None,
            search_aliases=self.search_aliases if self.search_aliases else None,
            essentials_category=self.essentials_category,
            has_intermediate_output=self.has_intermediate_output,
        )


class NodeOutput:
    def __init__(self, *args, ui=None, expand=None, block_execution=None):
        self.args = args
        self.ui = ui
        self.expand = expand
        self.block_execution = block_execution

    @property
    def result(self):
        return self.args if len(self.args) > 0 else None

    def __getitem__(self, index):
        return self.args[index]


# ------------------------------------------------------------------------------------- nodes
_CACHED = {  # class property -> Schema attribute, filled once per class by GET_SCHEMA
    "_DESCRIPTION": "description", "_CATEGORY": "category", "_EXPERIMENTAL": "is_experimental",
    "_DEPRECATED": "is_deprecated", "_DEV_ONLY": "is_dev_only", "_API_NODE": "is_api_node",
    "_OUTPUT_NODE": "is_output_node", "_HAS_INTERMEDIATE_OUTPUT": "has_intermediate_output",
    "_INPUT_IS_LIST": "is_input_list", "_NOT_IDEMPOTENT": "not_idempotent", "_ACCEPT_ALL_INPUTS": "accept_all_inputs",
}


def _cached(name):
    def get(cls):
        if getattr(cls, name) is None:
            cls.GET_SCHEMA()
        return getattr(cls, name)
    return classproperty(get)


class ComfyNode(ABC):
    RELATIVE_PYTHON_MODULE = None
    SCHEMA = None
    hidden: HiddenHolder = None  # set on the per-execution clone

    _DESCRIPTION = _CATEGORY = _EXPERIMENTAL = _DEPRECATED = _DEV_ONLY = _API_NODE = None
    _OUTPUT_NODE = _HAS_INTERMEDIATE_OUTPUT = _INPUT_IS_LIST = _NOT_IDEMPOTENT = _ACCEPT_ALL_INPUTS = None
    _RETURN_TYPES = _RETURN_NAMES = _OUTPUT_IS_LIST = _OUTPUT_TOOLTIPS = None

    @classmethod
    @abstractmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    @abstractmethod
    def execute(cls, **kwargs) -> NodeOutput:
        raise NotImplementedError

    def __init__(self):
        self.__class__.VALIDATE_CLASS()

    @classmethod
    def VALIDATE_CLASS(cls):
        for name in ("define_schema", "execute"):
            if getattr(cls, name).__func__ is getattr(ComfyNode, name).__func__:
                raise Exception(f"No {name} function was defined for node class {cls.__name__}.")

    FUNCTION = "EXECUTE_NORMALIZED"  # (ComfyUI: "EXECUTE_NORMALIZED_ASYNC" for an async execute)

    @classmethod
    def EXECUTE_NORMALIZED(cls, *args, **kwargs) -> NodeOutput:
        out = cls.execute(*args, **kwargs)
        if out is None:
            return NodeOutput()
        if isinstance(out, NodeOutput):
            return out
        if isinstance(out, tuple):
            return NodeOutput(*out)
        if isinstance(out, dict):
            return NodeOutput(*out.get("result", ()), ui=out.get("ui"), expand=out.get("expand"))
        raise Exception(f"Invalid return type from node: {type(out)}")

    @classmethod
    def PREPARE_CLASS_CLONE(cls, v3_data: dict | None):
        """The class ComfyUI runs: a copy whose ``hidden`` holds this execution's hidden values
        (``v3_data["hidden_inputs"]`` maps ``Hidden`` members to values)."""
        clone = type(f"{cls.__name__}Clone", (cls,) + cls.__bases__, dict(cls.__dict__))
        clone.hidden = HiddenHolder.from_dict(v3_data["hidden_inputs"] if v3_data else None)
        return clone

    @classmethod
    def FINALIZE_SCHEMA(cls) -> Schema:
        schema = cls.define_schema()
        schema.finalize()
        return schema

    @classmethod
    def GET_SCHEMA(cls) -> Schema:
        cls.VALIDATE_CLASS()
        schema = cls.FINALIZE_SCHEMA()
        schema.validate()
        for attr, name in _CACHED.items():
            if getattr(cls, attr) is None:
                setattr(cls, attr, getattr(schema, name))
        if cls._RETURN_TYPES is None:
            cls._RETURN_TYPES = [o.io_type for o in schema.outputs]
            cls._RETURN_NAMES = [o.display_name if o.display_name else o.io_type for o in schema.outputs]
            cls._OUTPUT_IS_LIST = [o.is_output_list for o in schema.outputs]
            cls._OUTPUT_TOOLTIPS = [o.tooltip if o.tooltip else None for o in schema.outputs]
        cls.SCHEMA = schema
        return schema

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return cls.FINALIZE_SCHEMA().get_v1_info(cls).input

    @classmethod
    def GET_NODE_INFO_V1(cls) -> dict:
        return asdict(cls.GET_SCHEMA().get_v1_info(cls))

    DESCRIPTION = _cached("_DESCRIPTION")
    CATEGORY = _cached("_CATEGORY")
    EXPERIMENTAL = _cached("_EXPERIMENTAL")
    DEPRECATED = _cached("_DEPRECATED")
    DEV_ONLY = _cached("_DEV_ONLY")
    API_NODE = _cached("_API_NODE")
    OUTPUT_NODE = _cached("_OUTPUT_NODE")
    HAS_INTERMEDIATE_OUTPUT = _cached("_HAS_INTERMEDIATE_OUTPUT")
    INPUT_IS_LIST = _cached("_INPUT_IS_LIST")
    NOT_IDEMPOTENT = _cached("_NOT_IDEMPOTENT")
    ACCEPT_ALL_INPUTS = _cached("_ACCEPT_ALL_INPUTS")
    RETURN_TYPES = _cached("_RETURN_TYPES")
    RETURN_NAMES = _cached("_RETURN_NAMES")
    OUTPUT_IS_LIST = _cached("_OUTPUT_IS_LIST")
    OUTPUT_TOOLTIPS = _cached("_OUTPUT_TOOLTIPS")
