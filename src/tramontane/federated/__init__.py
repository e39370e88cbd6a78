"""Federated learning with user-level DP on Flower: DP-FedAvg, and CANIFE audits of its rounds.

Runs on Flower's deployment runtime (a SuperLink, SuperNodes, `flwr run`; no simulation engine, no Ray):
tramontane adds no networking or process management of its own.

- `dp_fedavg` (no flwr, no torch at import): the mechanism. Poisson sampling of clients, flat clipping of
  each client's update, Gaussian noise once on the sum, the fixed denominator, one ledger event per round
  (McMahan et al. 2018).
- `canary` (no flwr): CANIFE's crafted canary update on the canary client, and the server's score.
- `task` (numpy): the demo task, logistic regression on UCI Adult split across clients.
- `flower` (flwr): the `DPFedAvg` strategy and `clipping_mod`, the client mod that clips.
- `auditing` (flwr): `CanifeStrategy`, a wrapper that audits the rounds of the strategy it wraps.
- `app` (flwr): the ServerApp and ClientApp of the demo, and `write_flower_app`, which writes the Flower
  app directory to `flwr run` (`tramontane federated app DIR` on the command line).

The flwr modules need the optional dependency: `pip install 'tramontane[federated]'`.
"""

INSTALL_HINT = "federated learning needs Flower: pip install 'tramontane[federated]'"

__all__ = ["INSTALL_HINT"]
