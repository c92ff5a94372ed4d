"""The code of a logged flowmill MLflow model (MLflow's "models from code"): MLflow runs this file
when it loads the model, so the model holds no pickled object. Not imported by flowmill itself."""

from mlflow.models import set_model

from flowmill.train.tracking_model import FlowmillModel

set_model(FlowmillModel())
