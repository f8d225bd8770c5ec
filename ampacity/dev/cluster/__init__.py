"""The local control plane: real Kubernetes components on loopback, kwok for the GPU nodes."""
