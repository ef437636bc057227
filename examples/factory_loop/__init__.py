"""The factory loop example: ``train_policy`` rebuilds the sensor-mode MoE policy that imitates
the heated tank's expert controller. The plant, the expert, ``deploy.toml`` and the bundled
package live in :mod:`sdk.demo` (``r1edge demo`` ships them); ``deploy.toml`` and ``model``
here link to them."""
