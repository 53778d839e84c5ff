"""distributed=True: 2 gloo ranks each encode half the data; results equal the single-process ones."""
import json
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eval_fakes import write_cifar10, write_karpathy


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _evaluate(root, distributed):
    from alip.eval.load import load_model
    from alip.eval.retrieval import evaluate_retrieval
    from alip.eval.zeroshot import evaluate_zeroshot
    torch.manual_seed(0)
    model, preprocess, tokenizer = load_model("ALIP-tiny")
    zs = evaluate_zeroshot(model, preprocess, tokenizer, "cifar10", root, batch_size=4, distributed=distributed)
    rt = evaluate_retrieval(model, preprocess, tokenizer, os.path.join(root, "ann.json"), root, batch_size=2,
                            recall_k=(1, 2, 3), distributed=distributed)
    return {"zeroshot": zs, "retrieval": rt}


def _worker(rank, port, root):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from alip.eval.features import make_loader
        out = _evaluate(root, distributed=True)
        out["shard"] = list(make_loader(list(range(17)), batch_size=100, distributed=True))[0].tolist()
        with open(os.path.join(root, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one(tmp_path):
    import numpy as np
    from PIL import Image
    root = str(tmp_path)
    write_cifar10(root, [i % 10 for i in range(17)])  # 17 images: uneven shards (9 + 8)
    rng = np.random.default_rng(0)
    for i in range(5):                                # 5 images, 15 captions
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    write_karpathy(str(tmp_path / "ann.json"),
                   [("", f"{i}.png", "test", [f"photo {i} {w}" for w in ("one", "two", "three")]) for i in range(5)])
    single = json.loads(json.dumps(_evaluate(root, distributed=False)))
    mp.spawn(_worker, nprocs=2, join=True, args=(_free_port(), root))
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["shard"] == list(range(rank, 17, 2))  # each rank encodes only its items
        for part in ("zeroshot", "retrieval"):
            for k, v in single[part].items():
                assert got[part][k] == v or (v != v and got[part][k] != got[part][k]), (rank, part, k)
