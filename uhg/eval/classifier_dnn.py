"""DNN classifier two-sample test for calorimeter showers (the CaloChallenge 2022 kind).

The CaloChallenge evaluation (`code/evaluate.py` of github.com/CaloChallenge/homepage) trains a
fully connected network -- one input layer and two hidden layers of equal width, LeakyReLU, one
logit, binary cross-entropy, Adam -- on per-shower vectors of the two samples (`cls-low`: log10
E_inc and the voxel energies divided by E_inc; `cls-high`: layer energies, centres and widths per
layer, ...), keeps the epoch that does best on a test split, calibrates its scores with isotonic
regression and quotes the ROC AUC on a third split (60/20/20).

This is the same kind of classifier, made at least as strong on small samples: inputs
standardised with the training split's mean and spread (the network then sees the rare
late-layer voxels on the same scale as the core), smaller batches and a larger step (more
updates per epoch), the epoch kept by the lowest test loss (a smoother criterion than accuracy)
and early stopping once the test loss stops improving. `tests/test_eval_classifier_dnn.py`
shows it separating a 10% change of one layer's energy; docs/results.md compares it with the
evaluation script itself on the same files (uhg's AUC is the higher on both inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DnnSettings:
    """Network and training of the DNN classifier (CaloChallenge: width 2048, 2 hidden layers,
    batch 1000, lr 2e-4, 50 epochs)."""

    width: int = 512
    hidden_layers: int = 2
    batch_size: int = 256
    lr: float = 5e-4
    max_epochs: int = 40
    patience: int = 6
    """Stop after this many epochs without a lower test loss."""


def _network(d: int, s: DnnSettings):
    import torch

    layers: list[torch.nn.Module] = [torch.nn.Linear(d, s.width), torch.nn.LeakyReLU()]
    for _ in range(s.hidden_layers):
        layers += [torch.nn.Linear(s.width, s.width), torch.nn.LeakyReLU()]
    layers.append(torch.nn.Linear(s.width, 1))
    return torch.nn.Sequential(*layers)


def dnn_scores(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
               x_eval: list[np.ndarray], seed: int, settings: DnnSettings = DnnSettings()) -> list[np.ndarray]:
    """Train on (x_train, y_train), select the epoch on (x_test, y_test); sigmoid scores of the
    selected network for each array of `x_eval`. Inputs (n, d) float; labels 0/1."""
    import torch

    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    # floor the spread: a voxel that is almost never hit would otherwise blow up to huge values
    std = np.maximum(std, 0.1 * float(np.median(std[std > 0])) if np.any(std > 0) else 1.0)

    def tensor(x):
        return torch.from_numpy(((x - mean) / std).astype(np.float32))

    # fork_rng: the caller's torch RNG is untouched; enable_grad: callers may be inside no_grad
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)
        net = _network(x_train.shape[1], settings)
        opt = torch.optim.Adam(net.parameters(), lr=settings.lr)
        loss_fn = torch.nn.BCEWithLogitsLoss()
        xt, yt = tensor(x_train), torch.from_numpy(y_train.astype(np.float32))
        xs, ys = tensor(x_test), torch.from_numpy(y_test.astype(np.float32))
        gen = torch.Generator().manual_seed(seed)
        best, best_state, since = float("inf"), None, 0
        for _ in range(settings.max_epochs):
            net.train()
            for idx in torch.randperm(len(xt), generator=gen).split(settings.batch_size):
                opt.zero_grad(set_to_none=True)
                loss_fn(net(xt[idx]).squeeze(1), yt[idx]).backward()
                opt.step()
            net.eval()
            with torch.no_grad():
                test_loss = float(loss_fn(net(xs).squeeze(1), ys))
            if test_loss < best:
                best, since = test_loss, 0
                best_state = {k: v.clone() for k, v in net.state_dict().items()}
            else:
                since += 1
                if since >= settings.patience:
                    break
        net.load_state_dict(best_state)
        net.eval()
        with torch.no_grad():
            return [torch.sigmoid(net(tensor(x)).squeeze(1)).numpy().astype(np.float64) for x in x_eval]
