"""Train a ternary (W1.58A8) MLP on scikit-learn's digits with a plain PyTorch loop, then deploy it.

No trainer, no BitLab training helpers: quantization-aware training is ordinary
training because BitLinear, in train mode, fake-quantizes its weights and
activations with straight-through gradients.  The deploy step is one call per
layer (``freeze()``): weights are packed to 2 bits, the fp32 latent copy is
dropped, and the forward runs through the kernel registry.

Run from the repository root::

    python examples/train_digits.py
"""
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bitcore.config import BitQuantConfig  # noqa: E402
from bitlayers import BitLinear, convert_to_bitlinear  # noqa: E402

torch.manual_seed(0)
torch.set_num_threads(1)  # the matmuls here are tiny; more threads only add synchronization

# 1. Data: fixed stratified split, standardized with the training statistics.
features, labels = load_digits(return_X_y=True)
x_train, x_test, y_train, y_test = train_test_split(features, labels, test_size=0.25, stratify=labels, random_state=0)
mean, std = x_train.mean(0), x_train.std(0)
std[std < 1e-6] = 1.0
x_train = torch.tensor((x_train - mean) / std, dtype=torch.float32)
x_test = torch.tensor((x_test - mean) / std, dtype=torch.float32)
y_train, y_test = torch.tensor(y_train), torch.tensor(y_test)

# 2. An ordinary float model; every nn.Linear becomes a BitLinear (LayerNorm in front of each
#    keeps the quantizers' inputs well scaled, BitNet's habit).
def float_mlp() -> nn.Module:
    return nn.Sequential(
        nn.LayerNorm(64), nn.Linear(64, 256), nn.ReLU(),
        nn.LayerNorm(256), nn.Linear(256, 256), nn.ReLU(),
        nn.LayerNorm(256), nn.Linear(256, 10),
    )


config = BitQuantConfig(weight_bits=1.58, activation_dtype="int8", activation_granularity="per_token")
model = convert_to_bitlinear(float_mlp(), config)
print(model.bitlab_report)

# 3. Quantization-aware training: AdamW, a large learning rate for the latent weights, cosine decay.
epochs, batch_size, lr = 30, 64, 3e-3
optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
steps = epochs * math.ceil(len(x_train) / batch_size)
schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
start = time.perf_counter()
model.train()
for epoch in range(epochs):
    order = torch.randperm(len(x_train))
    for i in range(0, len(x_train), batch_size):
        batch = order[i:i + batch_size]
        loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
        optimizer.zero_grad()
        loss.backward()  # straight-through: gradients reach the fp32 latent weights
        optimizer.step()
        schedule.step()
    if epoch % 10 == 9:
        print(f"epoch {epoch + 1:>2}: last batch loss {loss.item():.4f}")
print(f"trained in {time.perf_counter() - start:.1f} s")

# 4. Evaluate in eval mode (packed weights through the registry's kernel), then freeze for deployment.
model.eval()
with torch.no_grad():
    eval_preds = model(x_test).argmax(1)
layers = [m for m in model.modules() if isinstance(m, BitLinear)]
for layer in layers:
    layer.freeze()  # pack to 2 bits per weight, drop the fp32 latent weight
with torch.no_grad():
    frozen_preds = model(x_test).argmax(1)
accuracy = (frozen_preds == y_test).float().mean().item()
print(f"test accuracy of the frozen ternary model: {accuracy:.4f}")
print(f"frozen predictions equal the eval-mode predictions on every test sample: {torch.equal(frozen_preds, eval_preds)}")

packed = sum(layer.weight_memory_bytes() for layer in layers)
fp32 = sum(4 * layer.in_features * layer.out_features for layer in layers)
print(f"BitLinear weights: {packed:,} bytes packed (2 bits per ternary weight + scales) vs {fp32:,} bytes fp32 ({fp32 / packed:.1f}x)")
print(f"kernel used on cpu: {layers[0].kernel('cpu').name}")

# 5. The frozen state_dict holds only packed weights and scales; it loads into a fresh model.
state = model.state_dict()
fresh = convert_to_bitlinear(float_mlp(), config)
fresh.load_state_dict(state)
with torch.no_grad():
    assert torch.equal(fresh.eval()(x_test), model(x_test))
print("frozen checkpoint reloaded into a fresh model: identical outputs")
