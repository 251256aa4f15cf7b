"""The plan file: the contract between ``zoplan plan`` and the runtime.

A plan says everything the runtime needs and nothing it must guess: the model (its shape and a
hash of it), the machine (name, where it was loaded from and a hash of its description), the
batch shape, the ZO hyper-parameters, the layout with its rank table and process groups, the
transfer settings, the resident blocks and the prediction. It is versioned and read strictly:
unknown keys, a rank table that does not follow from the layout, or a hash that does not match
are errors that name the file and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, cast

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt

from zoplan import __version__
from zoplan.errors import ZoplanError
from zoplan.fileio import Strict, brief, check_version, read_yaml, short, validate, write_yaml
from zoplan.layout import Layout
from zoplan.limits import MAX_LORA_RANK, MAX_PLAN_BYTES, MAX_PREFIX_TOKENS, MAX_SLICES_PER_BLOCK, MAX_STEPS
from zoplan.models import ModelShape
from zoplan.topology import Machine
from zoplan.tuning import FULL, Tuning
from zoplan.vocab import Dtype, Method, Schedule, Upload

PLAN_VERSIONS = (1,)


class ModelRef(Strict):
    name: str
    hash: str
    shape: dict[Any, Any]


class TopologyRef(Strict):
    name: str
    source: str
    hash: str


class ProfileRef(Strict):
    """The calibration profile the prediction used (``zoplan plan --profile``)."""

    source: str
    hash: str


class BatchSpec(Strict):
    global_batch: PositiveInt
    seq_len: PositiveInt
    micro_batch: PositiveInt


class ZoSettings(Strict):
    """MeZO hyper-parameters (Malladi et al. 2023 use eps 1e-3 and lr 1e-6 to 1e-7 for OPT)."""

    eps: PositiveFloat = 1e-3
    lr: PositiveFloat = 1e-6
    weight_decay: NonNegativeFloat = 0.0
    seed: int = Field(default=0, ge=0, lt=2**63)
    steps: int = Field(default=1000, ge=1, le=MAX_STEPS)
    # the plain value, as Strict keeps it (use_enum_values): it equals Schedule.CONSTANT
    lr_schedule: Schedule = cast(Schedule, Schedule.CONSTANT.value)


def zo_settings(**values: Any) -> ZoSettings:
    """ZoSettings from command-line values: a bad one is a ZoplanError naming the field."""
    from pydantic import ValidationError

    from zoplan.fileio import describe_validation_error

    try:
        return ZoSettings(**values)
    except ValidationError as exc:
        raise ZoplanError(f"invalid ZO setting: {describe_validation_error(exc)}") from None


class RankEntry(Strict):
    rank: int
    node: int
    local_rank: int
    gpu: str
    role: Literal["compute", "relay"]
    replica: int | None = None
    branch: Literal["+", "-", "+-"] | None = None


class LayoutSpec(Strict):
    perturbation: Literal[1, 2]
    data: PositiveInt
    nodes: PositiveInt
    world_size: PositiveInt
    placement: str
    compute_gpus: list[str]
    ranks: list[RankEntry]
    groups: dict[str, list[list[int]]]


class TransferSpec(Strict):
    upload: Upload
    movers: list[str]
    slices_per_block: PositiveInt
    wire_dtype: Dtype
    param_dtype: Dtype
    prefetch: PositiveInt
    # each mover's share of every round, as weights (sliced uploads; absent: equal shares)
    shares: list[PositiveInt] | None = None


class Prediction(Strict):
    step_time_s: float
    tokens_per_s: float
    gpu_memory_bytes: int
    host_memory_bytes: int
    bottleneck: str
    bound_s: float
    bound_fraction: float
    usd_per_mtok: float | None = None
    baseline_step_time_s: float | None = None
    speedup_vs_baseline: float | None = None


class TuningSpec(Strict):
    """What is trained (zoplan.tuning): ``full`` (every weight), ``lora`` or ``prefix`` (an
    adapter on read-only blocks)."""

    method: Method = FULL.method
    lora_rank: int = Field(default=FULL.lora_rank, ge=1, le=MAX_LORA_RANK)
    lora_alpha: PositiveFloat = FULL.lora_alpha
    prefix_tokens: int = Field(default=FULL.prefix_tokens, ge=1, le=MAX_PREFIX_TOKENS)

    @classmethod
    def of(cls, tuning: Tuning) -> TuningSpec:
        return cls(
            method=tuning.method,
            lora_rank=tuning.lora_rank,
            lora_alpha=tuning.lora_alpha,
            prefix_tokens=tuning.prefix_tokens,
        )

    def to_tuning(self) -> Tuning:
        return Tuning(self.method, self.lora_rank, self.lora_alpha, self.prefix_tokens)


class Plan(Strict):
    version: int
    zoplan: str
    model: ModelRef
    topology: TopologyRef
    batch: BatchSpec
    zo: ZoSettings
    layout: LayoutSpec
    transfer: TransferSpec
    resident_blocks: list[int]
    prediction: Prediction
    profile: ProfileRef | None = None
    tuning: TuningSpec = TuningSpec()  # full-parameter unless an adapter is trained

    # ----- conversions ------------------------------------------------------------------------
    def to_layout(self) -> Layout:
        return Layout(
            perturbation=self.layout.perturbation,
            data=self.layout.data,
            compute_gpus=tuple(self.layout.compute_gpus),
            upload=self.transfer.upload,
            movers=tuple(self.transfer.movers),
            slices_per_block=self.transfer.slices_per_block,
            wire_dtype=self.transfer.wire_dtype,
            param_dtype=self.transfer.param_dtype,
            micro_batch=self.batch.micro_batch,
            prefetch=self.transfer.prefetch,
            resident=tuple(self.resident_blocks),
            nodes=self.layout.nodes,
            placement=self.layout.placement,
            shares=tuple(self.transfer.shares or ()),
        )

    def model_shape(self) -> ModelShape:
        return ModelShape.from_dict(self.model.shape)


def build_plan(
    *,
    shape: ModelShape,
    machine: Machine,
    layout: Layout,
    global_batch: int,
    seq_len: int,
    zo: ZoSettings,
    prediction: Prediction,
    tuning: Tuning = FULL,
) -> Plan:
    ranks = layout.ranks()
    # the casts: a layout holds plain values, checked by Layout.validate (perturbation 1 or 2, dtypes
    # of DTYPE_BYTES) or made by the search ("whole", "sliced"); the schema validates them again and
    # keeps a Dtype's or an Upload's plain value (Strict: use_enum_values)
    return Plan(
        version=PLAN_VERSIONS[-1],
        zoplan=__version__,
        model=ModelRef(name=shape.name, hash=shape.hash, shape=shape.to_dict()),
        topology=TopologyRef(name=machine.name, source=machine.source, hash=machine.hash),
        batch=BatchSpec(global_batch=global_batch, seq_len=seq_len, micro_batch=layout.micro_batch),
        zo=zo,
        layout=LayoutSpec(
            perturbation=cast(Literal[1, 2], layout.perturbation),
            data=layout.data,
            nodes=layout.nodes,
            world_size=len(ranks),
            placement=layout.placement,
            compute_gpus=list(layout.compute_gpus),
            ranks=[RankEntry(**r) for r in ranks],
            groups=layout.groups(),
        ),
        transfer=TransferSpec(
            upload=cast(Upload, layout.upload),
            movers=list(layout.movers),
            slices_per_block=layout.slices_per_block,
            wire_dtype=cast(Dtype, layout.wire_dtype),
            param_dtype=cast(Dtype, layout.param_dtype),
            prefetch=layout.prefetch,
            shares=list(layout.shares) or None,
        ),
        resident_blocks=list(layout.resident),
        prediction=prediction,
        tuning=TuningSpec.of(tuning),
        profile=(
            ProfileRef(source=machine.profile.source, hash=machine.profile.profile.hash)
            if machine.profile is not None
            else None
        ),
    )


HEADER = (
    "# zoplan plan: written by `zoplan plan`, read by `zoplan timeline` and `zoplan run`.\n"
    "# Edit with care: the rank table and groups must follow from the layout.\n"
)


def write_plan(plan: Plan, path: Path) -> None:
    data = plan.model_dump(mode="json")
    if plan.tuning == TuningSpec():  # full-parameter: the plan reads as it always has
        data.pop("tuning")
    if plan.transfer.shares is None:  # equal shares: likewise
        data["transfer"].pop("shares")
    write_yaml(path, data, header=HEADER)


def load_plan(path: str | Path) -> Plan:
    """Read a plan strictly and check that it is consistent with itself."""
    path = Path(path)
    data = read_yaml(path, "plan", limit=MAX_PLAN_BYTES)
    check_version(data, path, "plan", PLAN_VERSIONS)
    plan = validate(Plan, data, path, "plan")
    try:
        shape = plan.model_shape()
    except ZoplanError as exc:
        raise ZoplanError(f"{path}: invalid plan: {short(exc.message, 2000)}", fix=exc.fix) from None
    if shape.hash != plan.model.hash:
        raise ZoplanError(
            f"{path}: field 'model.hash' ({plan.model.hash}) does not match 'model.shape' ({shape.hash})",
            fix="the model shape was edited: write the plan again with `zoplan plan`",
        )
    if plan.model.name != shape.name:
        raise ZoplanError(
            f"{path}: field 'model.name' ({brief(plan.model.name)}) does not match 'model.shape' ({brief(shape.name)})",
            fix="the model's name was edited: write the plan again with `zoplan plan`",
        )
    check_ranges(plan, shape, path)
    try:
        layout = plan.to_layout()
    except ZoplanError as exc:
        raise ZoplanError(f"{path}: invalid plan: {short(exc.message, 2000)}", fix=exc.fix) from None
    if layout.micro_batch and (
        plan.batch.global_batch % (layout.data * layout.nodes)
        or (plan.batch.global_batch // (layout.data * layout.nodes)) % layout.micro_batch
    ):
        raise ZoplanError(
            f"{path}: field 'batch': global batch {plan.batch.global_batch} does not "
            f"divide into {layout.data * layout.nodes} replicas of micro-batches of "
            f"{layout.micro_batch}"
        )
    expected = [RankEntry(**r) for r in layout.ranks()]
    if plan.layout.ranks != expected or plan.layout.world_size != len(expected):
        raise ZoplanError(
            f"{path}: field 'layout.ranks' does not follow from the layout "
            f"(perturbation {layout.perturbation} x data {layout.data} x nodes "
            f"{layout.nodes}, movers {', '.join(layout.movers)})",
            fix="write the plan again with `zoplan plan` instead of editing ranks",
        )
    if plan.layout.groups != layout.groups():
        raise ZoplanError(
            f"{path}: field 'layout.groups' does not follow from the layout",
            fix="write the plan again with `zoplan plan`",
        )
    return plan


def check_ranges(plan: Plan, shape: ModelShape, path: Path | str) -> None:
    """Every number of a plan within what it means, before anything is sized by it: the runtime
    allocates by these fields, and the simulator issues one upload per slice."""
    from zoplan.search import workload_problems

    again = "write the plan again with `zoplan plan ... -o` instead of editing it"

    def refuse(field: str, value: object, problem: str, fix: str = again) -> None:
        raise ZoplanError(f"{path}: field '{field}' ({brief(value)}) {problem}", fix=fix)

    b = plan.batch
    for name, problem, fix in workload_problems(shape, b.global_batch, b.seq_len, plan.tuning.to_tuning().positions):
        refuse(f"batch.{name}", getattr(b, name), problem, f"{again} ({fix})")
    if b.micro_batch > b.global_batch:
        refuse("batch.micro_batch", b.micro_batch, f"is more than the global batch ({b.global_batch})")
    most = min(MAX_SLICES_PER_BLOCK, shape.block_params())
    if plan.transfer.slices_per_block > most:
        refuse(
            "transfer.slices_per_block",
            plan.transfer.slices_per_block,
            f"is more than the slices a block can be cut into ({most})",
        )
    if plan.transfer.prefetch > shape.layers:
        refuse("transfer.prefetch", plan.transfer.prefetch, f"is more than the {shape.layers} blocks of {shape.name}")
    if len(plan.resident_blocks) > shape.layers:
        refuse("resident_blocks", plan.resident_blocks, f"lists more than the {shape.layers} blocks of {shape.name}")
    bad = [x for x in plan.resident_blocks if not 0 <= x < shape.layers]
    if bad:
        refuse("resident_blocks", bad, f"outside 0..{shape.layers - 1}, the blocks of {shape.name}")
    if len(set(plan.resident_blocks)) != len(plan.resident_blocks):
        refuse("resident_blocks", plan.resident_blocks, "names a block twice")
    lay = plan.layout
    gpus = set(lay.compute_gpus) | set(plan.transfer.movers)
    tabled = list(dict.fromkeys(r.gpu for r in lay.ranks))
    lists = {"layout.compute_gpus": lay.compute_gpus, "transfer.movers": plan.transfer.movers}
    for field, names in lists.items():
        # a name edited in this list alone (one in both lists and not in the rank table: the table was edited)
        others = {g for other, more in lists.items() if other != field for g in more}
        stray = [g for g in names if g not in tabled and g not in others]
        if stray and tabled:
            refuse(field, stray, f"names what no entry of 'layout.ranks' runs on (they run on {', '.join(tabled)})")
    if lay.nodes * len(gpus) != len(lay.ranks):
        # the rank table is rebuilt from the layout below: never build one of another size
        if lay.nodes > len(lay.ranks):
            refuse("layout.nodes", lay.nodes, f"is more than the {len(lay.ranks)} entries of 'layout.ranks'")
        refuse(
            "layout.ranks",
            f"{len(lay.ranks)} entries",
            f"is not one per GPU ({len(gpus)}) per node ({lay.nodes}) of the layout's compute GPUs and movers",
        )


def check_plan_gpus(plan: Plan, machine: Machine, plan_path: str | Path = "plan") -> None:
    """Refuse a plan naming a GPU the machine does not have."""
    for field, names in (("layout.compute_gpus", plan.layout.compute_gpus), ("transfer.movers", plan.transfer.movers)):
        unknown = [g for g in names if g not in machine.gpus]
        if unknown:
            raise ZoplanError(
                f"{plan_path}: field '{field}' names {', '.join(map(brief, unknown))}, not a GPU "
                f"of topology '{machine.name}' ({', '.join(machine.gpus)})",
                fix="write the plan again with `zoplan plan --gpus ...` instead of editing it",
            )


def check_plan_matches(
    plan: Plan, *, machine: Machine | None = None, shape: ModelShape | None = None, plan_path: str | Path = "plan"
) -> None:
    """Refuse a plan made for another machine or model, naming both."""
    if machine is not None and machine.hash != plan.topology.hash:
        raise ZoplanError(
            f"{plan_path} was planned for topology '{plan.topology.name}' ({plan.topology.hash}), "
            f"but this machine is '{machine.name}' ({machine.hash})",
            fix="plan again for this machine with `zoplan plan --topology ...`",
        )
    if machine is not None:
        check_plan_gpus(plan, machine, plan_path)
    # the shape decides everything a plan says, not the name: a plan made with the preset
    # 'llama-2-70b' runs a checkpoint directory of that shape, whatever the directory is called
    differences = plan.model_shape().differences(shape) if shape is not None else []
    if differences:
        assert shape is not None  # only a shape given differs
        raise ZoplanError(
            f"{plan_path} was planned for model '{plan.model.name}' ({plan.model.hash}), "
            f"but the model given is '{shape.name}' ({shape.hash}): {', '.join(differences)}",
            fix="plan again for this model with `zoplan plan --model ...`",
        )
