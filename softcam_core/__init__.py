"""SoftCAM Review library: imaging, self-explainable models, explanations, metrics.

Never imports Streamlit; the app and the CLI both call these functions.
"""

__version__ = "0.1.0"
