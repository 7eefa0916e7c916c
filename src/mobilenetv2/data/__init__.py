"""Data: ImageFolder trees and the bad-file policy (`folders`), the seed's transforms (`transforms`), whole
datasets decoded into memory and augmented per batch (`batched`), and real dataset writers (`fashion_mnist`)."""
