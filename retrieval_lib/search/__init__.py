"""Search and its evaluation: exact/faiss k-NN, re-ranking (alpha-QE, DBA), the revisited protocol."""
from retrieval_lib.search.evaluate import compute_map, evaluate_revisited, map_by_labels, recall_at_k
from retrieval_lib.search.nearest import knn, rank_database
from retrieval_lib.search.rerank import alpha_qe, dba, exclude_self, expand
from retrieval_lib.search.compare import mean_ap_excluding, paired_comparison
from retrieval_lib.search.compress import Float16Codec, Float32Codec, PCACodec, PQCodec, compressed_pair, faiss_available
