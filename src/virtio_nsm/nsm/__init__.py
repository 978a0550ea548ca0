"""The sans-IO NSM device: codec, PCR bank, PKI, attestation and the device itself."""
