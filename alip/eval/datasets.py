"""Classification datasets for zero-shot and linear-probe evaluation, never downloaded.

Each dataset is read with torchvision's own class (``download=False``) or ImageFolder, with the
class names and prompt templates of the CLIP paper as shipped by ``open_clip.zero_shot_metadata``
(ImageNet) and clip_benchmark's ``en_classnames.json`` / ``en_zeroshot_classification_templates.json``
(the rest), fixed up the way clip_benchmark's ``build_dataset`` does. A missing dataset is a
``FileNotFoundError`` naming the path that is missing and the layout expected there; an image
that cannot be read is a ``ValueError`` naming its file.
"""
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import clip_benchmark.datasets
import open_clip
from torchvision import datasets as tvd

CB_DIR = Path(clip_benchmark.datasets.__file__).parent

# The ALIP README's zero-shot table, in its column order; its "Average" is the mean of these 11.
ALIP_TABLE = ("cifar10", "cifar100", "food101", "pets", "flowers", "sun397", "cars", "dtd",
              "caltech101", "fgvc_aircraft", "imagenet1k")
TITLES = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "food101": "Food101", "pets": "Pets",
          "flowers": "Flowers", "sun397": "SUN397", "cars": "Cars", "dtd": "DTD",
          "caltech101": "Caltech101", "fgvc_aircraft": "Aircraft", "imagenet1k": "ImageNet",
          "imagefolder": "ImageFolder"}
# Datasets whose headline number is mean-per-class accuracy (the reference and the CLIP paper).
MEAN_PER_CLASS = ("pets", "flowers", "caltech101", "fgvc_aircraft")
ALIASES = {"imagenet": "imagenet1k", "aircraft": "fgvc_aircraft", "stanford_car": "cars",
           "flowers102": "flowers", "oxford_pets": "pets"}
DATASETS = ALIP_TABLE + ("imagefolder",)
# Datasets without an official train/test split: zero-shot uses all images (clip_benchmark's
# protocol); the linear probe splits them with a seed (see linear_probe.py).
NO_SPLIT = ("sun397", "caltech101")

LAYOUTS = {
    "cifar10": "ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} "
               "(the python pickle batches of cifar-10-python.tar.gz)",
    "cifar100": "ROOT/cifar-100-python/{train,test,meta} (cifar-100-python.tar.gz)",
    "food101": "ROOT/food-101/{images/<class>/*.jpg,meta/train.json,meta/test.json}",
    "pets": "ROOT/oxford-iiit-pet/{images/*.jpg,annotations/trainval.txt,annotations/test.txt}",
    "flowers": "ROOT/flowers-102/{jpg/*.jpg,imagelabels.mat,setid.mat}",
    "sun397": "ROOT/SUN397/{ClassName.txt,a/abbey/*.jpg,...}",
    "cars": "ROOT/stanford_cars/{devkit/cars_meta.mat,devkit/cars_train_annos.mat,cars_train/,"
            "cars_test/,cars_test_annos_withlabels.mat}",
    "dtd": "ROOT/dtd/dtd/{images/<class>/*.jpg,labels/train1.txt,labels/test1.txt}",
    "caltech101": "ROOT/caltech101/101_ObjectCategories/<class>/*.jpg",
    "fgvc_aircraft": "ROOT/fgvc-aircraft-2013b/data/{images/,variants.txt,images_variant_*.txt}",
    "imagenet1k": "ROOT/val/<wnid>/*.JPEG (1000 class folders; ROOT/train/<wnid>/ for the linear "
                  "probe), or ROOT itself holding the 1000 class folders",
    "imagefolder": "ROOT/<split>/<class>/*.{jpg,png,...} or ROOT/<class>/... (torchvision ImageFolder)",
}
REQUIRED = {  # paths under ROOT checked before torchvision is called
    "cifar10": ["cifar-10-batches-py/" + f for f in
                [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]],
    "cifar100": ["cifar-100-python/" + f for f in ("train", "test", "meta")],
    "food101": ["food-101/images", "food-101/meta"],
    "pets": ["oxford-iiit-pet/images", "oxford-iiit-pet/annotations"],
    "flowers": ["flowers-102/jpg", "flowers-102/imagelabels.mat", "flowers-102/setid.mat"],
    "sun397": ["SUN397/ClassName.txt"],
    "cars": ["stanford_cars/devkit/cars_meta.mat"],
    "dtd": ["dtd/dtd/images", "dtd/dtd/labels"],
    "caltech101": ["caltech101/101_ObjectCategories"],
    "fgvc_aircraft": ["fgvc-aircraft-2013b/data/images", "fgvc-aircraft-2013b/data/variants.txt"],
}
# (split for zero-shot / linear-probe test, split for linear-probe train); None: no split exists.
SPLITS = {"cifar10": ("test", "train"), "cifar100": ("test", "train"), "food101": ("test", "train"),
          "pets": ("test", "trainval"), "flowers": ("test", "train"), "sun397": (None, None),
          "cars": ("test", "train"), "dtd": ("test", "train"), "caltech101": (None, None),
          "fgvc_aircraft": ("test", "trainval"), "imagenet1k": ("val", "train"),
          "imagefolder": ("val", "train")}


class _CIFAR10(tvd.CIFAR10):
    """torchvision's CIFAR10 reading the same files without md5 checks (so generated test data,
    and re-packed copies, load; a missing file is reported by ``check_layout`` first)."""
    train_list = [(f, None) for f, _ in tvd.CIFAR10.train_list]
    test_list = [(f, None) for f, _ in tvd.CIFAR10.test_list]
    meta = {**tvd.CIFAR10.meta, "md5": None}


class _CIFAR100(tvd.CIFAR100):
    train_list = [(f, None) for f, _ in tvd.CIFAR100.train_list]
    test_list = [(f, None) for f, _ in tvd.CIFAR100.test_list]
    meta = {**tvd.CIFAR100.meta, "md5": None}


class NamedErrors:
    """Wraps a dataset so that an item that fails to load raises a ValueError naming its image
    file (torchvision's classes raise PIL's error without the path); other attributes pass
    through."""

    def __init__(self, name, ds):
        self.name, self.ds = name, ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        try:
            return self.ds[i]
        except IndexError:  # past the end: the end of iteration, not a bad file
            raise
        except Exception as e:
            raise ValueError(f"{self.name}: image {self.path_of(i)} cannot be read "
                             f"({type(e).__name__}: {e})") from e

    def path_of(self, i):
        for attr in ("samples", "_image_files", "_images"):  # ImageFolder, most torchvision sets
            items = getattr(self.ds, attr, None)
            if items is not None and i < len(items):
                item = items[i]
                return item[0] if isinstance(item, tuple) else item
        return f"number {i}"

    def __getattr__(self, attr):
        if attr.startswith("__") or attr in ("ds", "name"):
            raise AttributeError(attr)
        return getattr(self.ds, attr)


@dataclass
class ClassificationSet:
    name: str
    dataset: object        # a torch Dataset yielding (image, int label)
    classnames: list
    templates: list        # format strings with "{}" (or callables), as open_clip takes them
    mean_per_class: bool   # whether the protocol's headline number is mean-per-class accuracy


def canonical_name(name):
    name = ALIASES.get(name.lower(), name.lower())
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)} (or 'all')")
    return name


def _cb_json(filename):
    with open(CB_DIR / filename) as f:
        return json.load(f)


def default_templates(name):
    """The CLIP paper's templates for ``name`` as "{}" format strings."""
    if name in ("imagenet1k", "imagefolder"):
        return list(open_clip.OPENAI_IMAGENET_TEMPLATES)
    return [t.replace("{c}", "{}") for t in _cb_json("en_zeroshot_classification_templates.json")[name]]


def read_lines(path, what):
    """One entry per non-empty line (class names / templates files)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file {path} does not exist (expected one entry per line)")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise ValueError(f"{what} file {path} is empty (expected one entry per line)")
    return lines


def as_templates(templates, source="templates"):
    """Templates from a list or a file (one per line); every string template must contain {}."""
    if isinstance(templates, (str, os.PathLike)):
        source, templates = str(templates), read_lines(templates, "templates")
    templates = list(templates)
    for i, t in enumerate(templates):
        if isinstance(t, str):
            t = templates[i] = t.replace("{c}", "{}")
            if "{}" not in t:
                raise ValueError(f"{source}: template {i + 1} {t!r} has no {{}} for the class name")
    return templates


def as_classnames(classnames):
    if isinstance(classnames, (str, os.PathLike)):
        return read_lines(classnames, "class names")
    return list(classnames)


def check_layout(name, root):
    """Raise FileNotFoundError naming the first missing path and the expected layout."""
    layout = LAYOUTS[name].replace("ROOT", str(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{name}: dataset root {root} does not exist; expected {layout} "
                                "(nothing is downloaded: fetch it yourself)")
    for rel in REQUIRED.get(name, ()):
        if not os.path.exists(os.path.join(root, rel)):
            raise FileNotFoundError(f"{name}: {os.path.join(root, rel)} is missing; expected {layout} "
                                    "(nothing is downloaded: fetch it yourself)")


def _image_folder_dir(name, root, split):
    """ImageFolder directory: ROOT/<split> if it exists, else ROOT itself for the eval split."""
    sub = os.path.join(root, split)
    if os.path.isdir(sub):
        return sub
    if split in ("val", "test"):
        for other in ("val", "test"):
            if os.path.isdir(os.path.join(root, other)):
                return os.path.join(root, other)
        return root
    raise FileNotFoundError(f"{name}: {sub} is missing; expected {LAYOUTS[name].replace('ROOT', str(root))}")


def check_present(name, root, split=None):
    """Cheaply check that ``name``'s ``split`` (None: the evaluation split) is on disk under
    ``root`` -- the paths ``build_dataset`` needs first, no image or annotation is read -- so that
    a CLI evaluating several datasets can refuse a missing one before evaluating any. Raises the
    FileNotFoundError ``build_dataset`` would (naming the missing path and the layout)."""
    name = canonical_name(name)
    root = os.fspath(root)
    check_layout(name, root)
    if name not in ("imagenet1k", "imagefolder"):
        return
    folder = _image_folder_dir(name, root, split or SPLITS[name][0])
    if not any(e.is_dir() for e in os.scandir(folder)):
        raise FileNotFoundError(f"{name}: {folder} has no class folders; expected "
                                f"{LAYOUTS[name].replace('ROOT', root)}")


def _torchvision_dataset(name, root, split, transform):
    if name == "cifar10":
        return _CIFAR10(root, train=split == "train", transform=transform, download=False)
    if name == "cifar100":
        return _CIFAR100(root, train=split == "train", transform=transform, download=False)
    if name == "food101":
        return tvd.Food101(root, split=split, transform=transform, download=False)
    if name == "pets":
        return tvd.OxfordIIITPet(root, split=split, target_types="category", transform=transform,
                                 download=False)
    if name == "flowers":
        return tvd.Flowers102(root, split=split, transform=transform, download=False)
    if name == "sun397":
        ds = tvd.SUN397(root, transform=transform, download=False)
        # torchvision lists the images in rglob (file-system) order: sort, for reproducible runs
        order = sorted(range(len(ds._image_files)), key=lambda i: str(ds._image_files[i]))
        ds._image_files = [ds._image_files[i] for i in order]
        ds._labels = [ds._labels[i] for i in order]
        return ds
    if name == "cars":
        return tvd.StanfordCars(root, split=split, transform=transform, download=False)
    if name == "dtd":
        return tvd.DTD(root, split=split, transform=transform, download=False)
    if name == "caltech101":
        from clip_benchmark.datasets.caltech101 import Caltech101  # keeps the background class
        return Caltech101(root, target_type="category", transform=transform, download=False)
    if name == "fgvc_aircraft":
        return tvd.FGVCAircraft(root, split=split, annotation_level="variant", transform=transform,
                                download=False)
    raise AssertionError(name)


def _diagnose_pickles(folder):
    """Name the first CIFAR batch file that does not unpickle (for the error message)."""
    for f in sorted(os.listdir(folder)):
        try:
            with open(os.path.join(folder, f), "rb") as fh:
                pickle.load(fh, encoding="latin1")
        except Exception as e:
            return f"{os.path.join(folder, f)}: {type(e).__name__}: {e}"
    return None


def _classnames(name, ds):
    """Class names as clip_benchmark's build_dataset sets them."""
    if name == "imagenet1k":
        return list(open_clip.IMAGENET_CLASSNAMES)
    if name in ("flowers", "caltech101"):
        return _cb_json("en_classnames.json")[name]
    if name == "food101":
        return [c.replace("_", " ") for c in ds.classes]
    if name == "sun397":
        return [c.replace("_", " ").replace("/", " ") for c in ds.classes]
    if name == "imagefolder":
        return [c.replace("_", " ") for c in ds.classes]
    return list(ds.classes)


def dataset_root(root, name, imagenet_root=None):
    """ROOT for ``name``: ``root`` with ``{dataset}`` filled in (clip_benchmark's convention), or
    ``imagenet_root`` for ImageNet when given."""
    if name == "imagenet1k" and imagenet_root:
        return imagenet_root
    return root.format(dataset=name) if "{dataset}" in root else root


def build_dataset(name, root, transform=None, split=None, classnames=None, templates=None):
    """-> ClassificationSet. ``split=None`` is the protocol's evaluation split; "train" is the
    linear probe's train split; for SUN397 / Caltech101 (no official split) every image."""
    name = canonical_name(name)
    root = os.fspath(root)
    if split is None:
        split = SPLITS[name][0]
    if name in ("imagenet1k", "imagefolder"):
        if not os.path.isdir(root):
            check_layout(name, root)
        folder = _image_folder_dir(name, root, split)
        try:
            ds = tvd.ImageFolder(folder, transform=transform)
        except (FileNotFoundError, OSError) as e:
            raise FileNotFoundError(f"{name}: {folder} is not an ImageFolder ({e}); expected "
                                    f"{LAYOUTS[name].replace('ROOT', root)}") from e
        if name == "imagenet1k" and len(ds.classes) != 1000:
            raise ValueError(f"imagenet1k: {folder} has {len(ds.classes)} class folders, expected the "
                             f"1000 ImageNet-1k wnid folders; {LAYOUTS[name].replace('ROOT', root)}")
    else:
        check_layout(name, root)
        if name in NO_SPLIT:
            split = None
        try:
            ds = _torchvision_dataset(name, root, split, transform)
        except Exception as e:
            detail = None
            if name in ("cifar10", "cifar100"):
                detail = _diagnose_pickles(os.path.join(root, REQUIRED[name][0].split("/")[0]))
            raise ValueError(f"{name}: cannot read the dataset under {root} "
                             f"({detail or f'{type(e).__name__}: {e}'}); expected "
                             f"{LAYOUTS[name].replace('ROOT', root)}") from e
    names = as_classnames(classnames) if classnames is not None else _classnames(name, ds)
    n_classes = len(getattr(ds, "classes", None) or ds.categories)  # Caltech101 has .categories
    if len(names) != n_classes:
        raise ValueError(f"{name}: {len(names)} class names for the {n_classes} classes under {root}")
    temps = as_templates(templates) if templates is not None else default_templates(name)
    return ClassificationSet(name, NamedErrors(name, ds), names, temps, name in MEAN_PER_CLASS)
