"""Paper-and-simulation model of one GRPO training micro-step on 8 to 64 GPUs.

    python -m bench.scaling_model [--cluster h100|h800] [--mfu 0.4] [--markdown] [--plot docs/scaling.png]

Per micro-step (one forward + backward of the denoiser on `micro_batch` samples of one
data-parallel group) and per GPU, it counts the bytes each rank sends in

- the FSDP collectives: all-gather of the bf16 parameters in the forward and again in the
  backward (FSDP2 reshards after the forward), reduce-scatter of the gradients (fp32 or bf16)
  each micro-step or once per `accumulation` micro-steps; for HSDP (shard inside a node,
  replicate across nodes) the reduce-scatter stays in the node and an all-reduce of each
  node's shard crosses the network once per gradient sync;
- the Ulysses all-to-alls of sequence parallelism (group size sp, inside a node): per
  attention layer of the double- and single-stream blocks, q, k, v from sequence to head
  shards and the output back (4 in the forward, 4 of their gradients in the backward, 4 more
  when checkpointing recomputes the forward), plus the all-gather of the replicated text
  tokens' attention output (and its reduce-scatter in the backward);

and turns them into time with an alpha-beta model (a per-hop latency alpha, a bandwidth beta:
NVLink inside a node, the per-GPU share of the network across nodes, both derated by an
efficiency factor), against the compute time from the FLOP count of bench.throughput at an
assumed model-FLOP utilisation. docs/scaling.md states every assumption and shows the results.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import REPO  # noqa: E402
from bench.throughput import forward_flops, recipe_workload  # noqa: E402
from dancegrpo.models import get_model_spec  # noqa: E402

BF16 = 2


# ---------------------------------------------------------------------------------------------
# Parameter counts (analytic, from the model's spec; tests compare them with the diffusers classes)

def block_parameter_counts(model_name: str, config: dict) -> list[int]:
    """Parameters of each FSDP unit in `dancegrpo.distributed.blocks.transformer_blocks` order."""
    return get_model_spec(model_name).require("bench.scaling_model", "block_parameter_counts").block_parameter_counts(
        config)


def parameter_count(model_name: str, config: dict) -> int:
    """All parameters of the denoiser (blocks, embeddings, output head)."""
    return get_model_spec(model_name).require("bench.scaling_model", "parameter_count").parameter_count(config)


def attention_layers(model_name: str, config: dict) -> int:
    """Attention layers over the joint (video + text) sequence: the ones Ulysses shards."""
    return get_model_spec(model_name).require("bench.scaling_model", "attention_layers").attention_layers(config)


# ---------------------------------------------------------------------------------------------
# Communication volumes (bytes each rank sends)

def ring_share(n: int) -> float:
    """Fraction of a tensor each rank sends in an n-rank all-gather / reduce-scatter / all-to-all."""
    return (n - 1) / n


def fsdp_bytes(params: int, shard: int, param_bytes: int = BF16, grad_bytes: int = 4,
               replicas: int = 1, accumulation: int = 1) -> dict[str, float]:
    """Per-rank bytes sent by the FSDP collectives of one micro-step.

    shard: ranks one parameter is sharded over; replicas: HSDP replica groups (1 = plain FSDP);
    accumulation: micro-steps per gradient sync (the gradient collectives are amortised over them).
    """
    out = {"all_gather_forward": ring_share(shard) * params * param_bytes,
           "all_gather_backward": ring_share(shard) * params * param_bytes,
           "reduce_scatter": ring_share(shard) * params * grad_bytes / accumulation}
    # all-reduce of each rank's 1/shard of the gradients across replicas (ring: 2 (R-1)/R of it)
    out["all_reduce_replicas"] = 2 * ring_share(replicas) * params / shard * grad_bytes / accumulation
    return out


def padded_tokens(tokens: int, sp: int) -> int:
    """Video tokens after padding to a multiple of sp (as dancegrpo.distributed.hunyuan_ulysses pads)."""
    return math.ceil(tokens / sp) * sp


def ulysses_bytes(model_name: str, config: dict, image_tokens: int, text_tokens: int, batch: int, sp: int,
                  checkpointing: str = "full", act_bytes: int = BF16) -> dict[str, float]:
    """Per-rank bytes sent by sequence parallelism in one micro-step (0 when sp = 1).

    Each all-to-all moves a rank's (batch, N/sp, d) shard, of which (sp-1)/sp leaves the rank;
    the replicated text tokens' attention output is all-gathered over heads (each rank sends
    its (batch, N_t, d/sp) piece to the sp-1 others) and reduce-scattered in the backward.
    """
    if sp == 1:
        return {"all_to_all_forward": 0.0, "all_to_all_backward": 0.0, "all_to_all_recompute": 0.0,
                "text_gather": 0.0}
    d = config["num_attention_heads"] * config["attention_head_dim"]
    layers = attention_layers(model_name, config)
    local = batch * padded_tokens(image_tokens, sp) // sp * d * act_bytes
    per_pass = layers * 4 * ring_share(sp) * local
    text = layers * ring_share(sp) * batch * text_tokens * d * act_bytes   # all-gather of (batch, N_t, d)
    return {"all_to_all_forward": per_pass, "all_to_all_backward": per_pass,
            "all_to_all_recompute": per_pass if checkpointing != "none" else 0.0,
            "text_gather": text * (3 if checkpointing != "none" else 2)}   # forward (+ recompute) + backward


# ---------------------------------------------------------------------------------------------
# Time

@dataclass(frozen=True)
class Cluster:
    """Link and compute figures; the defaults are an 8 x H100 SXM node with 8 x 400 Gb/s InfiniBand."""

    name: str = "H100 SXM, 8 x 400 Gb/s IB per node"
    gpus_per_node: int = 8
    nvlink_gb_s: float = 450.0        # per direction per GPU (NVLink 4: 900 GB/s bidirectional)
    network_gb_s: float = 50.0        # per GPU: one 400 Gb/s NIC per GPU
    efficiency: float = 0.8           # achievable fraction of link bandwidth for large messages
    nvlink_alpha_us: float = 3.0      # per ring hop / per peer
    network_alpha_us: float = 10.0
    peak_tflops: float = 989.0        # dense bf16
    mfu: float = 0.40                 # assumed model-FLOP utilisation of the compute


CLUSTERS = {"h100": Cluster(),
            # H800: NVLink cut to 400 GB/s bidirectional; the paper's machines
            "h800": Cluster(name="H800 SXM, 8 x 400 Gb/s IB per node", nvlink_gb_s=200.0)}


def collective_seconds(bytes_sent: float, ranks: int, cluster: Cluster, all_to_all: bool = False,
                       calls: float = 1, spans_nodes: bool | None = None) -> float:
    """Alpha-beta time of `calls` collectives over `ranks` ranks sending `bytes_sent` in all.

    The ranks are consecutive (inside a node while they fit) unless `spans_nodes` says otherwise
    (HSDP's replica groups: one rank per node).

    Ring collectives across nodes run at the per-GPU network bandwidth; an all-to-all across
    nodes sends the off-node part over the network and the rest over NVLink at the same time.
    """
    if ranks <= 1 or bytes_sent == 0:
        return 0.0
    g = cluster.gpus_per_node
    nvlink = cluster.nvlink_gb_s * 1e9 * cluster.efficiency
    network = cluster.network_gb_s * 1e9 * cluster.efficiency
    if not (ranks > g if spans_nodes is None else spans_nodes):
        return calls * (ranks - 1) * cluster.nvlink_alpha_us * 1e-6 + bytes_sent / nvlink
    latency = calls * (ranks - 1) * cluster.network_alpha_us * 1e-6
    if not all_to_all:
        return latency + bytes_sent / network
    off_node = bytes_sent * max(ranks - g, 1) / (ranks - 1)     # peers outside the node, of the ranks-1 it sends to
    return latency + max(off_node / network, (bytes_sent - off_node) / nvlink)


@dataclass(frozen=True)
class Layout:
    world: int
    sp: int
    sharding: str = "fsdp"             # fsdp: shard over all ranks | hsdp: shard in a node, replicate across
    micro_batch: int = 1
    checkpointing: str = "full"
    grad_bytes: int = 4                # reduce-scatter dtype: 4 fp32, 2 bf16
    accumulation: int = 1              # micro-steps per gradient sync

    @property
    def dp(self) -> int:
        return self.world // self.sp


@dataclass
class StepEstimate:
    layout: Layout
    compute_s: float
    ideal_s: float                     # one GPU's compute for the micro-batch / sp (no comm, no replication)
    fsdp_s: float
    ulysses_s: float
    fsdp_bytes: float
    ulysses_bytes: float

    @property
    def step_s(self) -> float:
        """FSDP collectives overlap compute (prefetch); Ulysses all-to-alls sit on the critical path."""
        return max(self.compute_s + self.ulysses_s, self.fsdp_s)

    @property
    def efficiency(self) -> float:
        return self.ideal_s / self.step_s

    @property
    def samples_per_s(self) -> float:
        return self.layout.dp * self.layout.micro_batch / self.step_s


def rank_forward_flops(model_name: str, config: dict, image_tokens: int, text_tokens: int, batch: int,
                       sp: int) -> float:
    """One rank's forward FLOPs under sequence parallelism: its video tokens, all text tokens
    (replicated), 1/sp of the joint attention."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    local = padded_tokens(image_tokens, sp) // sp
    full_joint = padded_tokens(image_tokens, sp) + text_tokens
    joint_attention = lambda n: attention_layers(model_name, config) * 4 * n * n * d * batch  # noqa: E731
    return (forward_flops(model_name, config, local, text_tokens, batch) - joint_attention(local + text_tokens)
            + joint_attention(full_joint) / sp)


def estimate(model_name: str, layout: Layout, cluster: Cluster, image_tokens: int | None = None,
             text_tokens: int | None = None, config: dict | None = None) -> StepEstimate:
    """Predicted time of one micro-step per GPU for `layout` on `cluster` (recipe shapes by default)."""
    work = recipe_workload(model_name)
    config = config or work.config
    tokens = work.tokens
    ni, nt = image_tokens or tokens[0], text_tokens or tokens[1]
    if layout.world % layout.sp or layout.sp > cluster.gpus_per_node:
        raise ValueError(f"sp = {layout.sp} must divide the world size {layout.world} and fit in a node "
                         f"({cluster.gpus_per_node} GPUs): the all-to-alls run over NVLink")
    if layout.sharding not in ("fsdp", "hsdp"):
        raise ValueError(f"sharding {layout.sharding!r}: use fsdp or hsdp")
    recompute = {"none": 0, "selective": 0, "full": 1}[layout.checkpointing]
    flops = (3 + recompute) * rank_forward_flops(model_name, config, ni, nt, layout.micro_batch, layout.sp)
    rate = cluster.peak_tflops * 1e12 * cluster.mfu
    ideal = (3 + recompute) * forward_flops(model_name, config, ni, nt, layout.micro_batch) / rate / layout.sp

    params, units = parameter_count(model_name, config), len(block_parameter_counts(model_name, config)) + 1
    shard = layout.world if layout.sharding == "fsdp" else min(layout.world, cluster.gpus_per_node)
    replicas = layout.world // shard
    volumes = fsdp_bytes(params, shard, BF16, layout.grad_bytes, replicas, layout.accumulation)
    sync_calls = 1 / layout.accumulation
    fsdp_s = (collective_seconds(volumes["all_gather_forward"], shard, cluster, calls=units)
              + collective_seconds(volumes["all_gather_backward"], shard, cluster, calls=units)
              + collective_seconds(volumes["reduce_scatter"], shard, cluster, calls=units * sync_calls)
              + collective_seconds(volumes["all_reduce_replicas"], replicas, cluster, calls=2 * units * sync_calls,
                                   spans_nodes=True))
    a2a = ulysses_bytes(model_name, config, ni, nt, layout.micro_batch, layout.sp, layout.checkpointing)
    layers = attention_layers(model_name, config)
    passes = 3 if layout.checkpointing != "none" else 2
    ulysses_s = sum(collective_seconds(v, layout.sp, cluster, all_to_all=True, calls=4 * layers)
                    for k, v in a2a.items() if k.startswith("all_to_all"))
    ulysses_s += collective_seconds(a2a["text_gather"], layout.sp, cluster, calls=layers * passes)
    return StepEstimate(layout, flops / rate, ideal, fsdp_s, ulysses_s, sum(volumes.values()), sum(a2a.values()))


# ---------------------------------------------------------------------------------------------
# Report

WORLDS = (8, 16, 32, 64)
SP_SIZES = {"flux": (1, 2, 4), "hunyuan_video": (1, 2, 4, 8)}


def table(model_name: str, cluster: Cluster, base: Layout) -> list[str]:
    lines = ["| GPUs | sp | dp | compute s | Ulysses s | FSDP s | step s | samples/s | efficiency |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for world in WORLDS:
        for sp in SP_SIZES[model_name]:
            e = estimate(model_name, replace(base, world=world, sp=sp), cluster)
            lines.append(f"| {world} | {sp} | {world // sp} | {e.compute_s:.3f} | {e.ulysses_s:.3f} | {e.fsdp_s:.3f} "
                         f"| {e.step_s:.3f} | {e.samples_per_s:.1f} | {e.efficiency:.0%} |")
    return lines


def volume_lines(model_name: str, base: Layout) -> list[str]:
    work = recipe_workload(model_name)
    params = parameter_count(model_name, work.config)
    lines = [f"{model_name}: {params / 1e9:.2f} B parameters, {work.tokens[0]} video/image + {work.tokens[1]} text "
             f"tokens, micro-batch {base.micro_batch}; bytes sent per GPU per micro-step:", "",
             "| world | sp | FSDP all-gathers (fwd+bwd) GB | FSDP reduce-scatter GB "
             "| Ulysses GB (fwd, bwd, recompute) |",
             "|---:|---:|---:|---:|---:|"]
    for world in WORLDS:
        for sp in SP_SIZES[model_name]:
            f = fsdp_bytes(params, world, BF16, base.grad_bytes)
            u = ulysses_bytes(model_name, work.config, *work.tokens, base.micro_batch, sp, base.checkpointing)
            lines.append(f"| {world} | {sp} | {(f['all_gather_forward'] + f['all_gather_backward']) / 1e9:.1f} "
                         f"| {f['reduce_scatter'] / 1e9:.1f} | {sum(u.values()) / 1e9:.2f} |")
    return lines


def plot(path: Path, cluster: Cluster, layouts: dict[str, Layout]) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, len(layouts), figsize=(5.2 * len(layouts), 7.5), squeeze=False)
    for col, (title, base) in enumerate(layouts.items()):
        model_name = title.split()[0]
        for sp in SP_SIZES[model_name]:
            estimates = [estimate(model_name, replace(base, world=w, sp=sp), cluster) for w in WORLDS]
            axes[0][col].plot(WORLDS, [e.step_s for e in estimates], marker="o", label=f"sp={sp}")
            axes[1][col].plot(WORLDS, [e.efficiency for e in estimates], marker="o", label=f"sp={sp}")
        axes[0][col].set_title(title, fontsize=9)
        axes[0][col].set_ylabel("predicted micro-step time (s)")
        axes[1][col].set_ylabel("efficiency (ideal compute / step)")
        axes[1][col].set_ylim(0, 1.05)
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_xticks(WORLDS, [str(w) for w in WORLDS])
            ax.set_xlabel("GPUs")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"{cluster.name}; assumed MFU {cluster.mfu:.0%}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report_layouts() -> dict[str, Layout]:
    """The layouts of docs/scaling.md (the world and sp sizes vary over WORLDS and SP_SIZES)."""
    return {"flux FSDP (all-rank shard), fp32 grads": Layout(8, 1),
            "flux HSDP (shard in node), bf16 grads, sync/8": Layout(8, 1, "hsdp", grad_bytes=2, accumulation=8),
            "hunyuan_video FSDP (all-rank shard), fp32 grads": Layout(8, 1),
            "hunyuan_video HSDP (shard in node), bf16 grads, sync/8": Layout(8, 1, "hsdp", grad_bytes=2,
                                                                             accumulation=8)}


EXTRA_LAYOUTS = {"flux FSDP (all-rank shard), bf16 grads, micro-batch 8": Layout(8, 1, grad_bytes=2, micro_batch=8)}


def recipe_micro_steps(model_name: str) -> int:
    """Trained (sample, step) pairs of one GRPO iteration of the recipe (micro-batch 1 each):
    prompts x kept samples per prompt (best-of-N keeps the top k and bottom k) x ceil(tau x steps)."""
    import yaml
    cfg = yaml.safe_load((REPO / get_model_spec(model_name).require("bench.scaling_model", "bench_recipe")
                          .bench_recipe).read_text())
    g, steps = cfg["grpo"], cfg["sampler"]["num_steps"]
    kept = 2 * g["best_of_n_keep"] if g.get("best_of_n_keep") else g["group_size"]
    return g["prompts_per_iteration"] * kept * math.ceil(round(g["tau"] * steps, 9))


def iteration_seconds(model_name: str, layout: Layout, cluster: Cluster) -> float:
    """Training part of one recipe iteration: each data-parallel group runs its share of the micro-steps."""
    micro = math.ceil(recipe_micro_steps(model_name) / layout.micro_batch)
    return math.ceil(micro / layout.dp) * estimate(model_name, layout, cluster).step_s


def iteration_lines(cluster: Cluster) -> list[str]:
    lines = ["| model | layout | GPUs | sp | micro-steps per iteration | training s per iteration |",
             "|---|---|---:|---:|---:|---:|"]
    for title, base in {**report_layouts(), **EXTRA_LAYOUTS}.items():
        model_name = title.split()[0]
        for sp in SP_SIZES[model_name]:
            layout = replace(base, world=64, sp=sp)
            lines.append(f"| {model_name} | {title.split(' ', 1)[1]} | 64 | {sp} | {recipe_micro_steps(model_name)} "
                         f"| {iteration_seconds(model_name, layout, cluster):.0f} |")
    return lines


def markdown(cluster: Cluster) -> str:
    out = []
    for model_name in ("flux", "hunyuan_video"):
        out += volume_lines(model_name, Layout(8, 1)) + [""]
    for title, base in {**report_layouts(), **EXTRA_LAYOUTS}.items():
        out += [f"#### {title}", ""] + table(title.split()[0], cluster, base) + [""]
    out += ["#### Training part of one GRPO iteration on 64 GPUs", ""] + iteration_lines(cluster) + [""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cluster", default="h100", choices=sorted(CLUSTERS))
    parser.add_argument("--mfu", type=float, default=None, help="assumed model-FLOP utilisation (default 0.40)")
    parser.add_argument("--plot", type=Path, default=None, help="write the figure (PNG) here")
    args = parser.parse_args(argv)
    cluster = CLUSTERS[args.cluster]
    if args.mfu is not None:
        if not 0 < args.mfu <= 1:
            raise ValueError(f"--mfu {args.mfu} must be in (0, 1]")
        cluster = replace(cluster, mfu=args.mfu)
    text = markdown(cluster)
    print(text)
    if args.plot:
        plot(args.plot, cluster, report_layouts())
    return text


if __name__ == "__main__":
    main()
