"""Reading runs back: ``flowmill runs list|compare|logs`` and ``flowmill ui``.

``cli`` builds their parsers (light: only ``defaults`` is imported); ``commands`` and ``logs``
hold the handlers. ``store`` queries MLflow and summarises runs, ``tables`` prints them with
rich, ``server`` runs the ``mlflow server`` behind ``flowmill ui``.
"""
