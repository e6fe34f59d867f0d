"""The I2C skin-contact temperature sensor and its chip drivers."""
