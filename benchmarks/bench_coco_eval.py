"""COCO box mAP with pycocotools against faster-coco-eval: the same numbers, and how long each takes.

Ground truth: `fashion-scenes` test scenes (the real Fashion-MNIST test items, or random 28×28 blobs with
--synthetic-items). Predictions per scene: each ground-truth box jittered by a few pixels with a random label
(right 3 times in 4) scored 0.3–1, plus random boxes up to --boxes per image scored 0–0.7. Both backends evaluate
the same predictions through diffkd.metrics.DetectionEvaluator, interleaved over --repeats rounds after one
warm-up each; the script prints each backend's mAP, mAP@.5 and median seconds, and the time ratio.

    python benchmarks/bench_coco_eval.py --scenes 500 --boxes 100,300 --repeats 5
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from diffkd.data.fashion_mnist import DEFAULT_FASHION_MNIST_DIR, FashionMNIST  # noqa: E402
from diffkd.data.scenes import FashionScenes, generate_scenes  # noqa: E402
from diffkd.metrics import COCO_BACKENDS, DetectionEvaluator  # noqa: E402


def _items(synthetic: bool, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
    if not synthetic:
        items = FashionMNIST(data_dir, train=False)
        return items.data.numpy(), items.targets.numpy()
    rng = np.random.default_rng(0)
    images = np.zeros((200, 28, 28), dtype=np.uint8)
    for image in images:
        top, left, height, width = rng.integers(2, 8), rng.integers(2, 8), rng.integers(10, 20), rng.integers(10, 20)
        image[top:top + height, left:left + width] = rng.integers(120, 256, (height, width))
    return images, np.arange(200) % 10


def make_predictions(dataset: FashionScenes, boxes_per_image: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    size = dataset.scenes.config.image_size
    predictions = []
    for boxes, labels in zip(dataset.scenes.boxes, dataset.scenes.labels):
        truth = torch.from_numpy(boxes)
        jittered = truth + torch.randn(truth.shape, generator=generator) * 3
        kept = torch.rand(len(labels), generator=generator) < 0.75
        guessed = torch.where(kept, torch.from_numpy(labels), torch.randint(1, 11, (len(labels),), generator=generator))
        extra = max(boxes_per_image - len(labels), 0)
        corners = torch.rand(extra, 2, generator=generator) * (size - 8)
        sides = 4 + torch.rand(extra, 2, generator=generator) * (size / 2)
        random_boxes = torch.cat([corners, (corners + sides).clamp(max=size)], dim=1)
        predictions.append({"boxes": torch.cat([jittered, random_boxes]),
                            "scores": torch.cat([0.3 + 0.7 * torch.rand(len(labels), generator=generator),
                                                 0.7 * torch.rand(extra, generator=generator)]),
                            "labels": torch.cat([guessed, torch.randint(1, 11, (extra,), generator=generator)])})
    return predictions


def evaluate(dataset: FashionScenes, predictions: list[dict], backend: str) -> tuple[dict[str, float], float]:
    start = time.perf_counter()
    evaluator = DetectionEvaluator.for_dataset(dataset, backend=backend)
    evaluator.update(predictions, dataset.scenes.scene_ids.tolist())
    result = evaluator.compute()
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=500)
    parser.add_argument("--boxes", default="100,300", help="comma-separated predicted boxes per image")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--synthetic-items", action="store_true", help="random blobs instead of Fashion-MNIST")
    parser.add_argument("--data-dir", default=DEFAULT_FASHION_MNIST_DIR)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    images, labels = _items(args.synthetic_items, args.data_dir)
    dataset = FashionScenes(generate_scenes(images, labels, args.scenes, split="test", seed=0))
    print(f"{args.scenes} scenes, {sum(len(x) for x in dataset.scenes.labels)} ground-truth boxes; "
          f"median of {args.repeats} interleaved rounds")
    for boxes_per_image in (int(value) for value in args.boxes.split(",")):
        predictions = make_predictions(dataset, boxes_per_image)
        times: dict[str, list[float]] = {backend: [] for backend in COCO_BACKENDS}
        results = {backend: evaluate(dataset, predictions, backend)[0] for backend in COCO_BACKENDS}  # warm-up
        for _ in range(args.repeats):
            for backend in COCO_BACKENDS:
                result, seconds = evaluate(dataset, predictions, backend)
                if result != results[backend]:
                    raise RuntimeError(f"{backend} gave {result} after {results[backend]} on the same input")
                times[backend].append(seconds)
        medians = {backend: statistics.median(values) for backend, values in times.items()}
        baseline, candidate = COCO_BACKENDS
        same = results[baseline] == results[candidate]
        print(f"\n{boxes_per_image} predicted boxes per image ({boxes_per_image * args.scenes} in all):")
        for backend in COCO_BACKENDS:
            print(f"  {backend:<17} mAP {results[backend]['map']:.6f}  mAP@.5 {results[backend]['map50']:.6f}  "
                  f"{medians[backend]:.3f} s")
        ratio = medians[candidate] / medians[baseline]
        print(f"  identical numbers: {same}; {candidate} takes {ratio:.3f}× the time of {baseline}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
