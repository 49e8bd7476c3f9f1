"""One module per algorithm: the pure update math, the Flower Strategy (server half) and the
client half (an ``octomil_sim.client_app.ClientAlgorithm``), chosen by ``conf/strategy/*.yaml``."""
